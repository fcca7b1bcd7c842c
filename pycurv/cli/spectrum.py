"""``pycurv spectrum [TARGET]``: the Hessian spectrum of a PyTorch model's loss beyond λ1.

TARGET is what ``pycurv sharpness`` takes (``SCRIPT.py``, ``SCRIPT.py:function``
or ``module:function`` returning ``model, loss_fn, data[, optimizer]``; none:
the built-in example). Prints λ1 and λmin, the top-k eigenvalues with their
ratios λk/λ1, the trace with its standard error (Hutch++), and a summary of
the spectral density (stochastic Lanczos quadrature); ``--plot FILE`` draws
the density on a log axis with λ1 and the optimizer's threshold marked.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np

from ._common import CliError, emit_json, output_file, positive_float, positive_int
from .sharpness import _device, _load, _threshold, _unpack, add_setup_arguments


def register(sub):
    p = sub.add_parser(
        "spectrum",
        help="λ1, λmin, top-k ratios, trace and spectral density of a PyTorch model's loss Hessian",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_setup_arguments(p, lr_help="learning rate whose threshold is marked (default: the returned optimizer's)")
    p.add_argument("--plot", type=output_file, default=None, metavar="FILE",
                   help="draw the spectral density (log density axis, λ1 and the threshold marked) to FILE")
    p.add_argument("-k", "--top-k", type=positive_int, dest="k", default=5,
                   help="number of top eigenvalues and ratios λk/λ1 (default 5)")
    p.add_argument("--n-probes", type=positive_int, default=10, help="probes of the density (default 10)")
    p.add_argument("--n-steps", type=positive_int, default=80, help="Lanczos steps per probe (default 80)")
    p.add_argument("--trace-matvecs", type=positive_int, default=100,
                   help="products for the trace (Hutch++, default 100)")
    p.add_argument("--microbatch-size", type=positive_int, default=None, help="microbatches for the HVPs (less memory)")
    p.add_argument("--dtype", choices=("model", "float32", "float64"), default="model",
                   help="arithmetic of the Hessian-vector products (default: the model's)")
    p.add_argument("--mode", choices=("batch_stats", "eval", "train"), default="batch_stats",
                   help="which loss (as for pycurv sharpness; default batch_stats, the training loss)")
    p.add_argument("--device", type=_device, default=None, help="where the products run (default: the model's)")
    p.add_argument("--tol", type=positive_float, default=None,
                   help="relative residual tolerance of the eigenvalues (default: 1e-6 in float64, 2.4e-4 in float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the start vectors and probes (default 0)")
    p.add_argument("--json", action="store_true", help="strict JSON on stdout")
    p.set_defaults(func=run)


def _eigen(H, k: int, which: str, args):
    from .. import lanczos
    from .._adapter import default_tol
    from ..errors import ConvergenceWarning

    tol = args.tol if args.tol is not None else default_tol(H.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return lanczos(H, min(k, H.shape[0]), which=which, tol=tol, seed=args.seed, return_eigenvectors=False)


def run(args) -> int:
    from .._optional import require

    require("torch", "pycurv spectrum")
    import torch

    from .. import spectral_density, trace
    from .. import torch as pt
    from ..stability import format_number

    t_start = time.perf_counter()
    if args.plot is not None:
        require("matplotlib", "pycurv spectrum --plot")
    if args.target is None:
        torch.set_num_threads(1)  # the built-in model is tiny: threads only add synchronisation
    raw, label = _load(args.target)
    setup = _unpack(raw)
    model, loss_fn, data, optimizer = setup["model"], setup["loss_fn"], setup["data"], setup["optimizer"]
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"the setup's model must be a torch.nn.Module, got {type(model).__name__}")
    thr = _threshold(args, optimizer)
    kw = dict(mode=args.mode, microbatch_size=args.microbatch_size, device=args.device)
    if args.dtype != "model":
        kw["dtype"] = args.dtype
    H = pt.hessian(model, loss_fn, data, **kw)
    n = H.shape[0]
    top = _eigen(H, args.k, "LA", args)
    bottom = _eigen(H, 1, "SA", args)
    lam1 = float(top.eigenvalues[0])
    tr = trace(H, n_matvecs=args.trace_matvecs, method="hutch++" if args.trace_matvecs >= 4 else "hutchinson",
               seed=args.seed)
    sd = spectral_density(H, n_probes=args.n_probes, n_steps=args.n_steps, seed=args.seed)
    # The threshold bounds λ1 of H itself for SGD; Adam's and RMSprop's bound the preconditioned Hessian.
    marks_h = thr is not None and thr.quantity == "sharpness"
    ratios = [float(v / lam1) if lam1 != 0 else float("nan") for v in top.eigenvalues]
    grid_lo, grid_hi = float(sd.nodes.min()), float(sd.nodes.max())
    sigma = max(grid_hi - grid_lo, abs(grid_hi), np.finfo(float).tiny) / 500
    out = {
        "target": label,
        "n_parameters": n,
        "dtype": H.dtype,
        "device": H.device,
        "function": H.function,
        "lambda_max": lam1,
        "lambda_min": float(bottom.eigenvalues[0]),
        "top_k": [float(v) for v in top.eigenvalues],
        "ratios": ratios,
        "eigenvalues_converged": bool(top.converged and bottom.converged),
        "trace": {"value": tr.value, "stderr": tr.stderr, "method": tr.method, "matvecs": tr.n_matvecs},
        "density": {"n_probes": args.n_probes, "n_steps": args.n_steps, "matvecs": sd.n_matvecs,
                    "sigma": sigma, "nodes": sd.nodes.tolist(), "weights": sd.weights.tolist()},
        "threshold": None if thr is None else {"value": thr.max_stable_sharpness, "formula": thr.formula,
                                               "quantity": thr.quantity},
        "matvecs": int(top.n_matvecs + bottom.n_matvecs + tr.n_matvecs + sd.n_matvecs),
        "plot": args.plot,
        "function": H.function,
    }
    if args.plot is not None:
        _plot(sd, sigma, lam1, thr if marks_h else None, args.plot, label)
    out["seconds"] = time.perf_counter() - t_start
    if args.json:
        emit_json(out)
        return 0
    w = sys.stdout.write
    fmt = format_number
    w(f"pycurv spectrum: {label}\n")
    w(f"  parameters      {n:,} ({H.dtype}, {H.device})\n")
    w(f"  function        {H.function}\n")
    w(f"  λ1              {fmt(lam1)}{'' if top.converged else '  (not converged)'}\n")
    w(f"  λmin            {fmt(out['lambda_min'])}{'' if bottom.converged else '  (not converged)'}\n")
    w(f"  top {len(ratios)}:  " + ",  ".join(f"λ{i + 1} {fmt(v)} ({r:.3g} λ1)"
                                         for i, (v, r) in enumerate(zip(out["top_k"], ratios))) + "\n")
    w(f"  trace           {fmt(tr.value)} ± {fmt(tr.stderr)} (standard error, {tr.method}, {tr.n_matvecs} products)\n")
    w(f"  density         {args.n_probes} probes × {args.n_steps} steps, nodes in [{fmt(grid_lo)}, {fmt(grid_hi)}]"
      f"{'' if args.plot else ' (--plot FILE draws it)'}\n")
    if thr is not None:
        w(f"  threshold       {fmt(thr.max_stable_sharpness)} ({thr.formula}, bounds {thr.quantity})\n")
    if args.plot is not None:
        w(f"  plot            {args.plot}\n")
    w(f"  products        {out['matvecs']:,} in {out['seconds']:.1f} s\n")
    return 0


def _plot(sd, sigma, lam1, thr, path, label):
    from matplotlib.figure import Figure

    lo, hi = float(sd.nodes.min()), float(sd.nodes.max())
    pad = 5 * sigma
    grid = np.linspace(lo - pad, hi + pad, 2000)
    rho = sd.density(grid, sigma)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    floor = max(float(rho.max()) * 1e-8, np.finfo(float).tiny)
    ax.semilogy(grid, np.maximum(rho, floor), color="C0", label="spectral density (SLQ)")
    ax.axvline(lam1, color="C3", ls="--", label=f"λ1 = {lam1:.4g}")
    if thr is not None:
        ax.axvline(thr.max_stable_sharpness, color="k", ls=":",
                   label=f"threshold {thr.formula} = {thr.max_stable_sharpness:.4g}")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(label if len(label) <= 60 else label[:57] + "...", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
