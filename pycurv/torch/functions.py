"""The public entry points of the torch adapter: the operator, λ1, and λ1 against the optimizer's threshold."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from .._progress import measure_top
from ..errors import NoConvergence
from ..stability import margin_report, threshold_from_optimizer
from ..track import operator_options
from .operator import HessianOperator

__all__ = ["hessian", "sharpness", "stability_report"]


def hessian(
    model,
    loss_fn: Callable,
    data,
    *,
    preconditioner=None,
    dtype=None,
    mode: str = "batch_stats",
    seed: Optional[int] = None,
    microbatch_size: Optional[int] = None,
    reduction: str = "mean",
    hvp: str = "auto",
    cache=None,
    check_determinism: bool = True,
    probe_rtol: Optional[float] = None,
    l2: float = 0.0,
    params: Optional[Sequence[str]] = None,
    device=None,
    distributed: Optional[bool] = None,
    process_group=None,
    shard_basis: bool = False,
) -> HessianOperator:
    """The Hessian of ``loss_fn`` over ``data`` at ``model``'s parameters, as a pycurv operator.

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(inputs)`` (``model(*inputs)`` for a tuple, ``model(**inputs)``
        for a dict). Never modified.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar tensor``, the mean over the batch
        (``reduction="mean"``, e.g. ``torch.nn.functional.cross_entropy``) or the sum
        (``reduction="sum"``).
    data : (inputs, targets) or iterable of (inputs, targets)
        One batch, or several (a list, a DataLoader; not a one-shot generator).
        A single batch is a 2-tuple/list whose first item is a tensor or a dict.
        The loss is the mean over *all samples*: batches are weighted by their
        size. A ``DataLoader`` is replayed with one epoch's batches, drawn
        when the operator is built (its sampler's next epoch; the loader and
        the RNGs are left as they were), so shuffling does not change the
        function between products. Batches are moved to the model's device one at a time, so data
        larger than device memory works.
    preconditioner : torch.optim.Adam / AdamW / RMSprop, or 1-D tensor, optional
        Gives the symmetric P^{-1/2} H P^{-1/2} instead of H: from the optimizer's
        state (see :func:`adam_preconditioner`, :func:`rmsprop_preconditioner`) or
        the diagonal of P given directly. For Adam compare its top eigenvalue with
        (2 + 2 beta1) / ((1 - beta1) lr).
    dtype : torch.dtype or str, optional
        Arithmetic of the products; default the model's dtype. ``"float64"``
        casts a copy of the parameters, buffers and floating-point data.
    mode : {"batch_stats", "eval", "train"}
        Which function of the parameters the loss is. ``"batch_stats"``
        (default): the loss training descends, normalisation layers (batch
        and instance norm) normalising each batch by its own statistics, dropout
        off. ``"eval"``: every layer in eval mode, batch norm using its running
        statistics (for a trained model; a few hundred steps into training the
        running statistics are nothing like the batches', and the curvature of
        this function can differ from the training loss's by orders of
        magnitude). ``"train"``: every layer in training mode, dropout on (pass
        ``seed``). Running statistics are never updated. Models without
        batch-statistics layers or dropout give the same operator in every mode;
        :attr:`HessianOperator.function` says which function was built.
    seed : int, optional
        With ``mode="train"``, draws the same dropout masks in every product
        (seed + batch index; the global RNG is restored afterwards). Without it
        dropout makes each product different and the determinism probe raises.
    microbatch_size : int, optional
        Splits each batch into chunks of this many samples (less memory; with
        batch statistics, each chunk normalises by its own statistics).
    reduction : {"mean", "sum"}
        What ``loss_fn`` does over a batch; either way the operator is the
        Hessian of the mean loss over all samples.
    hvp : {"auto", "reverse", "forward"}
        ``"auto"``: each batch's loss and gradient are built once with their
        autograd graph (``create_graph=True``) and every product is one
        backward pass through it, the cost of one backward (1.5 to 4.5 times
        cheaper than the alternatives on CPU; bench/RESULTS.md); batches past
        the ``cache`` budget are recomputed per product by double backward.
        ``"reverse"``: double backward recomputed in every product (the least
        memory). ``"forward"``: forward-over-reverse (``torch.func.jvp`` of
        ``torch.func.grad``), which fails on operations without forward-mode
        derivatives (e.g. ``F.mse_loss``, pytorch#123996). ``hvp_method`` says
        which is used. Attention runs on the math backend of
        ``scaled_dot_product_attention`` (its fused kernels have no second
        derivative), so transformers models work with their default attention.
    cache : int, bool or None
        Budget in bytes for the cached gradient graphs (activations saved for
        the backward passes, the batch, the gradient): default (None or True)
        a quarter of the memory free on the device when the operator is built;
        False or 0 caches nothing. ``H.cache_batches`` and ``H.cache_bytes``
        say what is held; the solver releases it when a solve ends
        (:meth:`HessianOperator.release`), and the next product rebuilds it.
    check_determinism : bool
        After the first product, evaluates each batch's loss again and raises
        :class:`pycurv.NonDeterministicOperatorError` if it differs from the loss
        the product was taken of by more than ``probe_rtol`` (default 1000 unit
        roundoffs of ``dtype``): one forward pass per batch (with
        ``hvp="forward"``, which keeps no graph, the first product is computed
        twice instead). :meth:`HessianOperator.check_determinism` compares two
        whole products on demand.
    l2 : float
        Adds ``l2 * v`` (the Hessian of ``l2/2 * ||theta||^2``; torch's coupled
        ``weight_decay``).
    params : sequence of str, optional
        Names of the parameters to differentiate (default: all with ``requires_grad``).
    device : torch.device or str, optional
        Where the products run (default: the parameters' device).
    distributed : bool, optional
        Data parallelism over ``torch.distributed`` (default group, or
        ``process_group``): each rank passes *its shard* of the data; the products
        are summed over ranks on the device (gloo on CPU, NCCL on GPU), so every
        rank gets the Hessian of the mean loss over the union of the shards and
        :func:`pycurv.lanczos` takes identical steps everywhere (rank 0's seed and
        ``v0``). Default: on for a model wrapped in ``DistributedDataParallel``
        (its process group), off otherwise. A rank whose product raises makes
        every rank raise (:class:`pycurv.distributed.PeerError` on the others).
    process_group : torch.distributed.ProcessGroup, optional
        The group for ``distributed`` (implies ``distributed=True``).
    shard_basis : bool
        Each rank holds only its rows of every Lanczos vector (an even split of
        the flat parameter vector): basis memory 8 (n / ranks) (ncv + 1) bytes per
        rank instead of 8 n (ncv + 1); dot products are summed through the
        core's REDUCE requests, and ``matvec`` gathers the whole vector for each
        product. The eigenvectors returned are this rank's rows.

    Returns
    -------
    HessianOperator
        ``shape == (n, n)``, ``dtype`` the products' arithmetic, ``exact=False``.
        Memory: one copy of the parameters and buffers, the cached gradient
        graphs (within ``cache``), plus the products' own.
    """
    return HessianOperator(model, loss_fn, data, preconditioner=preconditioner, dtype=dtype, mode=mode, seed=seed,
                           microbatch_size=microbatch_size, reduction=reduction, hvp=hvp, cache=cache,
                           check_determinism=check_determinism, probe_rtol=probe_rtol, l2=l2, params=params,
                           device=device, distributed=distributed, process_group=process_group,
                           shard_basis=shard_basis)


def sharpness(model, loss_fn: Callable, data, *, tol: Optional[float] = None, seed: int = 0, v0=None,
              max_matvecs: Optional[int] = None, progress: Optional[bool] = None, criterion: str = "residual",
              **hessian_kwargs) -> float:
    """The largest algebraic eigenvalue of :func:`hessian` (``preconditioner=`` for Adam's).

    ``tol`` defaults to what the products' dtype can reach (1e-6 in float64,
    2.4e-4 in float32). Raises :class:`pycurv.NoConvergence` if it is not met.
    ``progress`` shows a progress line on stderr (default: when stderr is a terminal).
    ``criterion="eigenvalue"`` makes ``tol`` bound λ1's estimated relative error
    instead of the residual (fewer products; see :func:`pycurv.lanczos`).
    """
    op = hessian(model, loss_fn, data, **hessian_kwargs)
    res = measure_top(op, tol=tol, seed=seed, v0=v0, max_matvecs=max_matvecs, progress=progress,
                      criterion=criterion)
    if not res.converged:
        raise NoConvergence(res.message, result=res)
    return float(res.eigenvalues[0])


def stability_report(model, loss_fn: Callable, data, optimizer, *, tol: Optional[float] = None, seed: int = 0,
                     progress: Optional[bool] = None, group: int = 0, k: int = 1, **hessian_kwargs):
    """Sharpness against ``optimizer``'s stability threshold, in one call.

    For Adam/AdamW and RMSprop the preconditioned sharpness (the optimizer is
    the preconditioner; their coupled ``weight_decay`` is added to H) is compared
    with their threshold, e.g. (2 + 2 beta1) / ((1 - beta1) lr) for Adam; for SGD
    (with or without momentum) the sharpness (see :mod:`pycurv.stability`). Returns a
    :class:`pycurv.stability.MarginReport` (``value``, ``threshold``, ``margin``,
    ``stable``, ``quantity``, ``function``, ``advice``); its ``text`` reads like
    ``"λ1 = 19.7 is at 0.99 of 2/η = 20"``, and ``str(report)`` adds the function
    measured and, past the threshold, what to expect and do. The default
    ``mode="batch_stats"`` measures the loss the optimizer descends. With
    ``k >= 2`` the k largest eigenvalues of the same operator are measured too
    (``report.top_k``, ``report.ratios`` = λk/λ1).
    """
    thr = threshold_from_optimizer(optimizer, group=group)
    for key, value in operator_options(thr, optimizer).items():
        hessian_kwargs.setdefault(key, value)
    op = hessian(model, loss_fn, data, **hessian_kwargs)
    res = measure_top(op, tol=tol, seed=seed, progress=progress, k=k)
    top = [float(v) for v in res.eigenvalues]
    return margin_report(top[0], thr, function=op.function, top_k=tuple(top) if k >= 2 else ())
