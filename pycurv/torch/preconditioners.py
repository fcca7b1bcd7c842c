"""Optimizer preconditioners for the preconditioned sharpness λ1(P^{-1/2} H P^{-1/2}).

Adam's and AdamW's P = (1 - beta1^t) (sqrt(v_hat) + eps) and RMSprop's
P = sqrt(v) + eps, read from a ``torch.optim`` optimizer's state as flat float64
diagonals in the operator's parameter order (Kalra & Barkeshli 2024, eq. 6;
Cohen et al. 2022).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["adam_preconditioner", "rmsprop_preconditioner", "init_adam_from_gradients"]


def _scalar(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def _is_adam_like(opt) -> bool:
    return (hasattr(opt, "param_groups") and hasattr(opt, "state")
            and all("betas" in g and "eps" in g for g in opt.param_groups))


def adam_preconditioner(optimizer, params: Optional[Sequence] = None, *, names: Optional[Sequence[str]] = None,
                        beta1: Optional[float] = None, beta2: Optional[float] = None, eps: Optional[float] = None):
    """Adam's preconditioner P = (1 - beta1^t) * (sqrt(v_hat) + eps), flat, float64.

    v_hat = exp_avg_sq / (1 - beta2^t) (``max_exp_avg_sq`` with ``amsgrad=True``),
    t the optimizer's step count: Adam's update is then theta -= lr * P^{-1} m with
    m the first-moment EMA, so the preconditioned Hessian P^{-1/2} H P^{-1/2} is
    stable below (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr at beta1 = 0.9
    (Kalra & Barkeshli 2024, eq. 6; Cohen et al. 2022). Parameters in groups
    whose ``lr`` differs from group 0's are scaled by lr_0 / lr_g, so that group
    0's threshold applies to the whole operator.

    Parameters
    ----------
    optimizer : torch.optim.Adam or torch.optim.AdamW (or an optimizer with the same state)
    params : sequence of tensors, optional
        The parameters, in the order of the flat vector (default: every
        parameter of the optimizer, in group order).
    names : sequence of str, optional
        Names of ``params`` for error messages.
    beta1, beta2, eps : float, optional
        Use these instead of the optimizer's (what-if: the same second moments
        under other hyper-parameters).

    Returns
    -------
    torch.Tensor
        The diagonal of P, float64, on the parameters' device.
    """
    if not _is_adam_like(optimizer):
        raise TypeError(
            f"preconditioner must be a torch.optim.Adam, AdamW or RMSprop, or a 1-D tensor holding the "
            f"diagonal of P; got {type(optimizer).__name__}"
        )
    beta1_0 = _scalar(optimizer.param_groups[0]["betas"][0]) if beta1 is None else float(beta1)

    def diagonal(g, st):
        b1, b2 = (_scalar(b) for b in g["betas"])
        b1 = b1 if beta1 is None else float(beta1)
        b2 = b2 if beta2 is None else float(beta2)
        if b1 != beta1_0:
            raise ValueError(
                f"parameter groups have different beta1 ({beta1_0} and {b1}); one threshold "
                "(2 + 2 beta1) / ((1 - beta1) lr) cannot cover them"
            )
        t = _scalar(st["step"])
        v = st["max_exp_avg_sq"] if g.get("amsgrad", False) else st["exp_avg_sq"]
        v_hat = v.detach().to(torch.float64).reshape(-1) / (1.0 - b2**t)
        return (1.0 - b1**t) * (torch.sqrt(v_hat) + (_scalar(g["eps"]) if eps is None else float(eps)))

    return _per_parameter_diagonal(optimizer, params, names, "exp_avg_sq", diagonal)


def init_adam_from_gradients(optimizer) -> int:
    """GI-Adam: starts Adam's second moment at the first gradient squared, v0 = g0².

    Kalra & Barkeshli (2024, §6.2): standard Adam's preconditioned sharpness
    λ1(P^{-1/2} H P^{-1/2}) typically starts at 1e5 to 1e6, far above 38/η, and
    early training catapults; initialising v with g0² (bias correction kept)
    divides the initial λ1(P⁻¹H) by about 1/√(1 − β2) (31.6 at β2 = 0.999) and
    acts as an automatic warmup η_t = η √(1 − β2^t) (their App. I.2).

    Call it once, after the first ``loss.backward()`` and before the first
    ``optimizer.step()``: every parameter with a gradient gets the state Adam
    would create (``step`` 0, ``exp_avg`` 0) with ``exp_avg_sq = grad²``
    (and ``max_exp_avg_sq`` too with ``amsgrad=True``).

    Returns
    -------
    int
        The number of parameters initialised.
    """
    if not _is_adam_like(optimizer):
        raise TypeError(f"init_adam_from_gradients needs a torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    try:  # what Adam itself uses for its step counter
        from torch.optim.optimizer import _get_scalar_dtype as scalar_dtype
    except ImportError:  # pragma: no cover - older or newer torch
        def scalar_dtype(is_fused=None):
            return torch.get_default_dtype()
    count = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if optimizer.state.get(p):
                raise ValueError("the optimizer has state already (it has taken a step): GI-Adam initialises the "
                                 "second moment before the first optimizer.step()")
            on_device = group.get("capturable", False) or group.get("fused", False)
            step = (torch.zeros((), dtype=scalar_dtype(is_fused=bool(group.get("fused", False))), device=p.device)
                    if on_device else torch.tensor(0.0, dtype=scalar_dtype(), device="cpu"))
            g2 = p.grad.detach().square().clone(memory_format=torch.preserve_format)
            state = {"step": step, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                     "exp_avg_sq": g2}
            if group.get("amsgrad", False):
                state["max_exp_avg_sq"] = g2.clone()
            optimizer.state[p] = state
            count += 1
    if count == 0:
        raise ValueError("no parameter of the optimizer has a gradient: call loss.backward() first")
    return count


def _is_rmsprop_like(opt) -> bool:
    return (hasattr(opt, "param_groups") and hasattr(opt, "state")
            and all("alpha" in g and "eps" in g for g in opt.param_groups))


def rmsprop_preconditioner(optimizer, params: Optional[Sequence] = None, *, names: Optional[Sequence[str]] = None):
    """RMSprop's preconditioner P = sqrt(v) + eps (v - g_avg^2 with ``centered=True``), flat, float64.

    PyTorch's RMSprop divides the gradient by P without bias correction; its
    stability bound is on λ1(P^{-1/2} H P^{-1/2}) (see :mod:`pycurv.stability`).
    Groups with another ``lr`` than group 0's are rescaled as in :func:`adam_preconditioner`.
    """
    if not _is_rmsprop_like(optimizer):
        raise TypeError(f"expected a torch.optim.RMSprop (param_groups with 'alpha' and 'eps'), got {type(optimizer).__name__}")

    def diagonal(g, st):
        v = st["square_avg"].detach().to(torch.float64).reshape(-1)
        if g.get("centered", False):
            v = v - st["grad_avg"].detach().to(torch.float64).reshape(-1) ** 2
        return torch.sqrt(v) + _scalar(g["eps"])

    return _per_parameter_diagonal(optimizer, params, names, "square_avg", diagonal)


def _per_parameter_diagonal(optimizer, params, names, state_key: str, diagonal: Callable):
    """Concatenates diagonal(group, state) over params (default: every optimised
    parameter, in group order), each scaled by lr_0 / lr of its group."""
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    params = list(params)
    names = list(names) if names is not None else [f"parameter {i}" for i in range(len(params))]
    kind = type(optimizer).__name__
    lr0 = _scalar(optimizer.param_groups[0]["lr"])
    parts = []
    for name, p in zip(names, params):
        if id(p) not in group_of:
            raise ValueError(f"{name} is not optimised by the {kind} passed as preconditioner")
        g = optimizer.param_groups[group_of[id(p)]]
        st = optimizer.state.get(p, {})
        if state_key not in st or _scalar(st.get("step", 0)) < 1:
            raise ValueError(
                f"the {kind} passed as preconditioner has taken no step yet (no {state_key} for {name}); "
                f"its preconditioner exists after the first optimizer.step()"
            )
        P = diagonal(g, st)
        lr = _scalar(g["lr"])
        if lr != lr0:
            if lr <= 0:
                raise ValueError(f"parameter group of {name} has lr={lr}; the preconditioned operator needs lr > 0")
            P = P * (lr0 / lr)
        parts.append(P)
    return torch.cat(parts)


def _preconditioner_diagonal(pre, chosen, layout, device):
    if isinstance(pre, (torch.Tensor, np.ndarray)):
        P = torch.as_tensor(pre).to(device=device, dtype=torch.float64).reshape(-1)
        if P.numel() != layout.n:
            raise ValueError(f"preconditioner diagonal must have {layout.n} entries (one per parameter), got {P.numel()}")
    elif _is_rmsprop_like(pre) and not _is_adam_like(pre):
        P = rmsprop_preconditioner(pre, [p for _, p in chosen], names=[k for k, _ in chosen]).to(device)
    else:
        P = adam_preconditioner(pre, [p for _, p in chosen], names=[k for k, _ in chosen]).to(device)
    if not bool(torch.all(torch.isfinite(P))) or not bool(torch.all(P > 0)):
        bad = int(torch.count_nonzero(~(torch.isfinite(P) & (P > 0))))
        raise ValueError(f"the preconditioner diagonal must be finite and > 0; {bad} entries are not (is eps = 0?)")
    return P
