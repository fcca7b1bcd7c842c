"""``pycurv bound`` and ``pycurv lr-max``: the stability calculator.

``bound``: the largest stable sharpness at a learning rate (and, given a measured
sharpness, the margin and a verdict). ``lr-max``: the largest stable learning rate
for a sharpness. Both take the optimizer's hyper-parameters in PyTorch's
conventions; with ``--batch-size``, ``--dataset-size`` and ``--curvature-variance``
(SGD only) the bound is the minibatch mean-square condition of Wu et al. (2018).
"""

from __future__ import annotations

import argparse
import math
import sys

from ._common import CliError, emit_json, finite_float, output_file, positive_float, positive_int

_OPTIMIZER_FLAGS = ("momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps", "alpha")


def coefficient(text: str) -> float:
    """argparse type: a number with 0 <= x < 1 (momentum, dampening, betas, alpha)."""
    value = finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= value < 1, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def optimizer_name(text: str) -> str:
    from ..stability import OPTIMIZERS

    name = text.strip().lower()
    if name not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"unknown optimizer {text!r} (choose from {', '.join(OPTIMIZERS)}, "
                                         "in any case)")
    return name


def _add_common(p, *, need_lr: bool, need_sharpness: bool) -> None:
    p.add_argument("--optimizer", type=optimizer_name, required=True, metavar="{sgd,adam,adamw,rmsprop}",
                   help="optimizer, PyTorch conventions; any case (SGD, Adam, AdamW, RMSprop as in torch.optim)")
    if need_lr:
        p.add_argument("--lr", type=positive_float, required=True, help="learning rate η > 0")
    p.add_argument("--sharpness", type=nonnegative_float, required=need_sharpness,
                   help="measured λ1 (for adam/adamw/rmsprop: preconditioned sharpness λ1(P⁻¹H))")
    g = p.add_argument_group("optimizer hyper-parameters (PyTorch defaults)")
    g.add_argument("--momentum", type=coefficient, help="momentum β, 0 <= β < 1 (sgd, rmsprop; default 0)")
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (sgd)")
    g.add_argument("--dampening", type=coefficient, help="dampening d (sgd; default 0; d = β is EMA momentum)")
    g.add_argument("--weight-decay", type=nonnegative_float, dest="weight_decay",
                   help="weight decay (default 0; AdamW's is decoupled)")
    g.add_argument("--beta1", type=coefficient, help="Adam β1 (default 0.9)")
    g.add_argument("--beta2", type=coefficient, help="Adam β2 (default 0.999; enters only P)")
    g.add_argument("--eps", type=nonnegative_float, help="ε of Adam/RMSprop (default 1e-8; enters only P)")
    g.add_argument("--alpha", type=coefficient, help="RMSprop α (default 0.99; enters only P)")
    n = p.add_argument_group("minibatch noise (sgd; Wu et al. 2018, all three together)")
    n.add_argument("--batch-size", type=positive_int, dest="batch_size", help="batch size B")
    n.add_argument("--dataset-size", type=positive_int, dest="dataset_size", help="number of training examples N")
    n.add_argument("--curvature-variance", type=nonnegative_float, dest="curvature_variance",
                   help="variance s² of the per-example curvatures along the top direction")
    p.add_argument("--json", action="store_true", help="strict JSON on stdout")
    p.add_argument("--plot", metavar="FILE", type=output_file,
                   help="save the stability region in the (η, λ1) plane (needs matplotlib)")


_NOISE_DOC = ("Hyper-parameters follow PyTorch. With --batch-size, --dataset-size and --curvature-variance "
              "(SGD only) the bound is the minibatch mean-square condition of Wu et al. (2018).")


def register(sub):
    b = sub.add_parser("bound", help="largest stable sharpness at a learning rate",
                       description="The largest stable sharpness at a learning rate and, given a measured "
                                   "--sharpness, the margin and a stable/unstable verdict. " + _NOISE_DOC)
    _add_common(b, need_lr=True, need_sharpness=False)
    b.set_defaults(func=run_bound)
    m = sub.add_parser("lr-max", help="largest stable learning rate for a sharpness",
                       description="The largest stable learning rate for a measured sharpness. " + _NOISE_DOC)
    _add_common(m, need_lr=False, need_sharpness=True)
    m.set_defaults(func=run_lr_max)


def _hyperparameters(args) -> dict:
    return {k: getattr(args, k) for k in _OPTIMIZER_FLAGS if getattr(args, k) is not None}


def _noise(args):
    """(batch_size, dataset_size, curvature_variance) or None; all three or none."""
    values = {"--batch-size": args.batch_size, "--dataset-size": args.dataset_size,
              "--curvature-variance": args.curvature_variance}
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return None
    if len(given) != 3:
        missing = ", ".join(k for k in values if k not in given)
        raise CliError(f"{', '.join(given)} needs {missing} too (the minibatch model takes all three)")
    if args.optimizer != "sgd":
        raise CliError(f"the minibatch noise model applies to --optimizer sgd only, not {args.optimizer}")
    if args.batch_size > args.dataset_size:
        raise CliError(f"--batch-size must not exceed --dataset-size, got {args.batch_size} > {args.dataset_size}")
    return args.batch_size, args.dataset_size, args.curvature_variance


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isinf(x)):
        return "unbounded" if x is not None else "none"
    return f"{x:.6g}"


def _params_line(lr, hp: dict) -> str:
    parts = [] if lr is None else [f"lr={lr:g}"]
    for k, v in hp.items():
        parts.append(f"{k}={v}" if isinstance(v, bool) else f"{k}={v:g}")
    return "  " + "  ".join(parts)


def _plot(args, thr_lr, sharpness, hp, noise=None) -> None:
    if not args.plot:
        return
    from ..plot import plot_stability_region, save_figure

    fig = plot_stability_region(args.optimizer, lr=thr_lr, sharpness=sharpness, noise=noise, **hp)
    save_figure(fig, args.plot)
    sys.stderr.write(f"saved {args.plot}\n")


def run_bound(args) -> int:
    from ..stability import (margin_report, noisy_sgd_max_lr, noisy_sgd_sharpness_range, threshold)

    hp = _hyperparameters(args)
    noise = _noise(args)
    thr = threshold(args.optimizer, args.lr, **hp)
    out = {
        "optimizer": thr.optimizer,
        "lr": thr.lr,
        "hyperparameters": dict(thr.hyperparameters),
        "quantity": thr.quantity,
        "max_stable_sharpness": thr.max_stable_sharpness,
        "formula": thr.formula,
        "model": thr.model,
    }
    lo = None
    if noise is not None:
        b, n, s2 = noise
        rng = noisy_sgd_sharpness_range(args.lr, s2, b, n, **hp)
        lo, hi = (None, None) if rng is None else rng
        out.update({
            "max_stable_sharpness": hi,
            "min_stable_sharpness": lo,
            "noiseless_max_stable_sharpness": thr.max_stable_sharpness,
            "formula": "mean-square stability, Wu et al. 2018",
            "noise": {"batch_size": b, "dataset_size": n, "curvature_variance": s2},
        })
    s = args.sharpness
    if s is not None:
        hi = out["max_stable_sharpness"]
        if hi is None:
            margin, stable = None, False
        else:
            rep = margin_report(s, thr) if noise is None else margin_report(s, hi)
            margin, stable = rep.margin, rep.stable and (lo is None or s >= lo)
        out.update({"sharpness": s, "margin": margin, "stable": stable})
        if noise is None:
            out["max_stable_lr"] = thr.max_stable_lr(s)
        elif s + thr.hyperparameters["weight_decay"] > 0:
            out["max_stable_lr"] = noisy_sgd_max_lr(s, noise[2], noise[0], noise[1], **hp)
    _plot(args, args.lr, s, hp, noise)
    if args.json:
        emit_json(out)
        return 0
    w = sys.stdout.write
    w(f"{thr.model}\n")
    w(_params_line(thr.lr, thr.hyperparameters) + "\n")
    what = "sharpness" if thr.quantity == "sharpness" else "preconditioned sharpness"
    if noise is None:
        w(f"  largest stable {what}: {thr.symbol} ≤ {thr.formula} = {_num(thr.max_stable_sharpness)}\n")
    else:
        b, n, s2 = noise
        w(f"  minibatch noise: B={b} of N={n}, curvature variance s²={s2:g} (Wu et al. 2018)\n")
        if out["max_stable_sharpness"] is None:
            w("  no sharpness is mean-square stable: the curvature noise alone makes E[θ²] grow\n")
        else:
            w(f"  mean-square stable for {_num(out['min_stable_sharpness'])} ≤ λ1 ≤ "
              f"{_num(out['max_stable_sharpness'])}  (without noise: λ1 ≤ {thr.formula} = "
              f"{_num(thr.max_stable_sharpness)})\n")
    if s is not None:
        verdict = "stable" if out["stable"] else "UNSTABLE"
        if out["margin"] is None:
            w(f"  {thr.symbol} = {_num(s)}: {verdict}\n")
        else:
            rep = margin_report(s, thr) if noise is None else margin_report(s, out["max_stable_sharpness"])
            w(f"  {rep.text}: {verdict}\n")
        if lo is not None and s < lo:
            w(f"  (below {_num(lo)} the curvature noise dominates the mean curvature)\n")
        if "max_stable_lr" in out:
            w(f"  largest stable lr at {thr.symbol} = {_num(s)}: {_num(out['max_stable_lr'])}\n")
    return 0


def run_lr_max(args) -> int:
    from ..stability import noisy_sgd_max_lr, threshold

    hp = _hyperparameters(args)
    noise = _noise(args)
    s = args.sharpness
    thr = threshold(args.optimizer, 1.0, **hp)  # formula, quantity and model do not depend on η
    lr_max = thr.max_stable_lr(s)
    out = {
        "optimizer": thr.optimizer,
        "sharpness": s,
        "quantity": thr.quantity,
        "hyperparameters": dict(thr.hyperparameters),
        "max_stable_lr": lr_max,
        "formula": thr.formula,
        "model": thr.model,
    }
    if noise is not None:
        b, n, s2 = noise
        out.update({
            "max_stable_lr": noisy_sgd_max_lr(s, s2, b, n, **hp),
            "noiseless_max_stable_lr": lr_max,
            "formula": "mean-square stability, Wu et al. 2018",
            "noise": {"batch_size": b, "dataset_size": n, "curvature_variance": s2},
        })
    plot_lr = out["max_stable_lr"] if math.isfinite(out["max_stable_lr"]) else None
    _plot(args, plot_lr, s, hp, noise)
    if args.json:
        emit_json(out)
        return 0
    w = sys.stdout.write
    w(f"{thr.model}\n")
    w(_params_line(None, thr.hyperparameters) + "\n")
    if noise is None:
        if math.isinf(lr_max):
            w(f"  every learning rate is stable at {thr.symbol} = {_num(s)}\n")
        else:
            w(f"  largest stable lr at {thr.symbol} = {_num(s)}: {_num(lr_max)}  "
              f"(from {thr.symbol} ≤ {thr.formula})\n")
    else:
        b, n, s2 = noise
        w(f"  minibatch noise: B={b} of N={n}, curvature variance s²={s2:g} (Wu et al. 2018)\n")
        w(f"  largest mean-square stable lr at λ1 = {_num(s)}: {_num(out['max_stable_lr'])}  "
          f"(without noise: {_num(lr_max)})\n")
    return 0
