"""``pycurv demo``: extreme eigenvalues of a built-in Hessian-like operator.

The built-in spectrum has ten outliers (20 down to 1) over a bulk near zero and
one eigenvalue at -30: power iteration, the usual shortcut, returns -30 while
the sharpness is 20. The demo shows both ends and the power-iteration answer.
"""

from __future__ import annotations

import sys

import numpy as np

from ._common import emit_json, positive_int, seed64


def register(sub):
    p = sub.add_parser("demo", help="extreme eigenvalues of a built-in Hessian-like operator",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=positive_int, default=200_000, help="dimension (default 200000)")
    p.add_argument("--tol", type=float, default=1e-8, help="relative residual tolerance (default 1e-8)")
    p.add_argument("--seed", type=seed64, default=0, help="random seed, 0 <= seed < 2**64 (default 0)")
    p.add_argument("--json", action="store_true", help="strict JSON on stdout")
    p.set_defaults(func=run)


def _power_iteration(op, iters: int, seed: int) -> float:
    x = np.random.default_rng(seed).standard_normal(op.shape[0])
    x /= np.linalg.norm(x)
    lam = 0.0
    for _ in range(iters):
        y = op.matvec(x)
        lam = float(x @ y)
        x = y / np.linalg.norm(y)
    return lam


def run(args) -> int:
    from .. import lanczos
    from ..testing import SpectrumOperator, spectrum

    if args.n < 20:
        raise ValueError(f"--n must be at least 20 for the built-in spectrum, got {args.n}")
    eigs = spectrum("negative_dominant", args.n, seed=args.seed)
    op = SpectrumOperator(eigs, seed=args.seed)
    top = lanczos(op, 1, which="LA", tol=args.tol, seed=args.seed, return_eigenvectors=False)
    bottom = lanczos(op, 1, which="SA", tol=args.tol, seed=args.seed, return_eigenvectors=False)
    power = _power_iteration(op, top.n_matvecs, args.seed)
    exact_top, exact_bottom = float(eigs.max()), float(eigs.min())
    out = {
        "problem": f"built-in Hessian-like operator, n={args.n}",
        "lambda_max": float(top.eigenvalues[0]),
        "lambda_min": float(bottom.eigenvalues[0]),
        "exact_lambda_max": exact_top,
        "exact_lambda_min": exact_bottom,
        "matvecs": {"lambda_max": top.n_matvecs, "lambda_min": bottom.n_matvecs},
        "converged": bool(top.converged and bottom.converged),
        "seconds": top.time_total + bottom.time_total,
        "power_iteration": {"matvecs": top.n_matvecs, "estimate": power},
    }
    if args.json:
        emit_json(out)
        return 0
    w = sys.stdout.write
    w(f"pycurv demo: {out['problem']}\n")
    w(f"  largest eigenvalue   {out['lambda_max']:.12g}  ({top.n_matvecs} matvecs; exact {exact_top:.12g})\n")
    w(f"  smallest eigenvalue  {out['lambda_min']:.12g}  ({bottom.n_matvecs} matvecs; exact {exact_bottom:.12g})\n")
    w(f"  power iteration, {top.n_matvecs} matvecs: {power:.6g}  <- the largest |eigenvalue|, not the sharpness\n")
    w(f"  converged: {'yes' if out['converged'] else 'no'}\n")
    return 0
