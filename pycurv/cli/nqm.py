"""``pycurv nqm``: steps to a target loss against batch size in the noisy quadratic model.

The model of Zhang et al. (2019): curvatures h_i, per-example gradient noise c_i
(a batch of B has noise variance c_i/B), E[θ_i²] = init at the start. For each
batch size the best learning rate on a log grid below the stability limit, its
steps to the target, and the critical batch size (best steps = 2 × the
large-batch minimum).
"""

from __future__ import annotations

import argparse
import math
import sys

from ._common import CliError, emit_json, finite_float, output_file, positive_float, positive_int
from .stability import coefficient, nonnegative_float


def _float_list(text: str) -> list:
    try:
        values = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return values


def positive_list(text: str) -> list:
    values = _float_list(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"every value must be > 0, got {text!r}")
    return values


def nonnegative_list(text: str) -> list:
    values = _float_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"every value must be >= 0, got {text!r}")
    return values


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must satisfy 0 < value < 1, got {text!r}")
    return value


def grid_size(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (a grid from 1e-4 of the limit up to it), got {text!r}")
    return value


def register(sub):
    p = sub.add_parser("nqm", help="batch-size scaling in the noisy quadratic model",
                       description=__doc__.split("\n\n")[1])
    s = p.add_argument_group("spectrum (either --curvatures or the h_i = top·i^-power family)")
    s.add_argument("--curvatures", type=positive_list, metavar="LIST", help="curvatures h_i, comma-separated")
    s.add_argument("--dim", type=positive_int, default=None, help="number of directions (default 100)")
    s.add_argument("--top", type=positive_float, default=None, help="largest curvature λ1 (default 1)")
    s.add_argument("--power", type=nonnegative_float, default=None, help="decay exponent (default 1)")
    z = p.add_argument_group("noise and start")
    z.add_argument("--noise", type=nonnegative_list, metavar="LIST",
                   help="per-example gradient variances c_i, comma-separated (default c_i = h_i)")
    z.add_argument("--noise-scale", type=nonnegative_float, dest="noise_scale", default=None,
                   help="c_i = K·h_i (default 1)")
    z.add_argument("--init", type=positive_float, default=1.0, help="E[θ_i²] at the start (default 1)")
    t = p.add_argument_group("target and optimizer")
    tg = t.add_mutually_exclusive_group()
    tg.add_argument("--target", type=positive_float, help="target expected loss")
    tg.add_argument("--target-fraction", type=fraction, dest="target_fraction",
                    help="target as a fraction of the initial loss (default 0.01)")
    t.add_argument("--batch-sizes", type=positive_list, dest="batch_sizes", metavar="LIST",
                   default=[2.0 ** k for k in range(13)], help="batch sizes (default 1,2,4,...,4096)")
    t.add_argument("--momentum", type=coefficient, default=0.0, help="heavy-ball momentum β (default 0)")
    t.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    t.add_argument("--lrs", type=grid_size, default=80, help="learning rates on the search grid, >= 2 (default 80)")
    p.add_argument("--json", action="store_true", help="strict JSON on stdout")
    p.add_argument("--plot", metavar="FILE", type=output_file, help="save steps against batch size (needs matplotlib)")
    p.set_defaults(func=run)


def _model(args):
    from ..stability import NoisyQuadraticModel
    from ..stability.nqm import zhang_underflow

    if args.curvatures is not None:
        for flag in ("dim", "top", "power"):
            if getattr(args, flag) is not None:
                raise CliError(f"--curvatures and --{flag} exclude each other")
        h = args.curvatures
        _check_memory(len(h), args)
        desc = f"{len(h)} directions, λ1 = {max(h):g}"
    else:
        dim = 100 if args.dim is None else args.dim
        top = 1.0 if args.top is None else args.top
        power = 1.0 if args.power is None else args.power
        first = zhang_underflow(dim, top, power)
        if first is not None:
            raise CliError(f"--power {power:g} with --dim {dim}: h_i = {top:g}·i^-{power:g} underflows to 0 from "
                           f"i = {first} on; lower --power or --dim (at most {first - 1}), or raise --top")
        _check_memory(dim, args)
        model = NoisyQuadraticModel.zhang(dim, top=top, power=power)
        h = model.curvatures
        desc = f"{dim} directions, h_i = {top:g}·i^-{power:g}"
    if args.noise is not None:
        if args.noise_scale is not None:
            raise CliError("--noise and --noise-scale exclude each other")
        if len(args.noise) != len(h):
            raise CliError(f"--noise needs one value per curvature ({len(h)}), got {len(args.noise)}")
        c = args.noise
        desc += ", noise c_i given"
    else:
        k = 1.0 if args.noise_scale is None else args.noise_scale
        c = [k * x for x in h]
        desc += ", noise c_i = h_i" if k == 1.0 else f", noise c_i = {k:g}·h_i"
    return NoisyQuadraticModel(h, c, args.init), desc


def _check_memory(dim: int, args) -> None:
    """Refuses, before building anything, a search that would not fit in memory (naming its bytes)."""
    from ..stability.nqm import check_grid_memory

    try:
        check_grid_memory(dim, args.lrs, args.momentum > 0, f"--dim {dim} with --lrs {args.lrs}",
                          "lower --dim or --lrs")
    except MemoryError as exc:
        raise CliError(str(exc)) from None


def run(args) -> int:
    from ..stability import nqm_batch_scaling, nqm_lr_grid

    if args.nesterov and args.momentum == 0:
        raise CliError("--nesterov needs --momentum > 0")
    model, desc = _model(args)
    hp = {"momentum": args.momentum, "nesterov": bool(args.nesterov)}
    frac = 0.01 if args.target is None and args.target_fraction is None else args.target_fraction
    target = args.target if args.target is not None else frac * model.initial_loss
    lrs = nqm_lr_grid(model, args.lrs, **hp)
    res = nqm_batch_scaling(model, sorted(args.batch_sizes), target, lrs=lrs, **hp)
    rows = [{"batch_size": b, "best_lr": lr, "steps": st, "speedup": sp, "lr_fraction": lf}
            for b, lr, st, sp, lf in zip(res.batch_sizes.tolist(), res.best_lr.tolist(), res.steps.tolist(),
                                         res.speedup.tolist(), res.lr_fraction.tolist())]
    out = {
        "model": {"curvatures": model.curvatures, "noise": model.noise, "init": args.init,
                  "description": desc, "noise_scale_b_simple": model.noise_scale()},
        "momentum": args.momentum,
        "nesterov": bool(args.nesterov),
        "target": target,
        "initial_loss": model.initial_loss,
        "max_stable_lr": res.max_stable_lr,
        "rows": rows,
        "min_steps": res.min_steps,
        "critical_batch_size": res.critical_batch_size,
    }
    if args.plot:
        from ..plot import plot_nqm_scaling, save_figure

        save_figure(plot_nqm_scaling(res), args.plot)
        sys.stderr.write(f"saved {args.plot}\n")
    if args.json:
        emit_json(out)
        return 0
    w = sys.stdout.write
    opt = "SGD" if args.momentum == 0 else (
        f"SGD, {'Nesterov' if args.nesterov else 'heavy-ball'} momentum {args.momentum:g}")
    w(f"Noisy quadratic model (Zhang et al. 2019): {desc}; {opt}\n")
    share = f" ({100 * frac:.3g}% of the initial loss {model.initial_loss:.4g})" if args.target is None else ""
    w(f"  target loss {target:.4g}{share}; lr stability limit {res.max_stable_lr:.4g}\n")
    w(f"  {'batch':>8}  {'best lr':>10}  {'steps':>9}  {'speed-up':>8}  {'lr/limit':>8}\n")
    for r in rows:
        steps = "never" if math.isinf(r["steps"]) else f"{r['steps']:.0f}"
        lr = "-" if math.isnan(r["best_lr"]) else f"{r['best_lr']:.4g}"
        sp = "-" if not math.isfinite(r["speedup"]) else f"{r['speedup']:.2f}"
        lf = "-" if math.isnan(r["lr_fraction"]) else f"{r['lr_fraction']:.3f}"
        w(f"  {r['batch_size']:>8g}  {lr:>10}  {steps:>9}  {sp:>8}  {lf:>8}\n")
    if math.isfinite(res.min_steps):
        w(f"  large-batch limit S_min = {res.min_steps:.0f} steps; critical batch size "
          f"{res.critical_batch_size:.4g} (best steps = 2·S_min)\n")
    else:
        w("  the target is out of reach even without noise\n")
    return 0
