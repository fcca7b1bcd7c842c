"""``pycurv sharpness [TARGET]``: the sharpness of a PyTorch model and the verdict it implies.

TARGET is ``SCRIPT.py``, ``SCRIPT.py:function`` or ``module:function``; the
function (default ``setup``) returns ``model, loss_fn, data[, optimizer]`` (a
tuple or a dict with those keys); a script without ``setup()`` may define them
as module variables instead. Without TARGET a built-in example runs.
Prints λ1 and λmin of the loss Hessian, the optimizer's threshold and the
margin, and the largest stable learning rate of the usual optimizers; with
``--batch-size B``, also SGD's noisy bound (Wu et al. 2018) from the curvature
variance measured on microbatches of B samples.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from typing import Any, Dict, Optional

from ._common import CliError, UserCodeError, emit_json, positive_float, positive_int
from .stability import coefficient, nonnegative_float

_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")


def register(sub):
    p = sub.add_parser(
        "sharpness",
        help="sharpness of a PyTorch model's loss and the stability verdict",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_setup_arguments(p, lr_help="learning rate to judge (default: the returned optimizer's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="SGD batch size B: adds the noisy-SGD bound from the curvature variance")
    p.add_argument("--microbatch-size", type=positive_int, default=None,
                   help="microbatches for the HVPs (less memory); with --batch-size the curvature variance "
                        "is measured on microbatches of this size (default: B)")
    p.add_argument("--dtype", choices=("model", "float32", "float64"), default="model",
                   help="arithmetic of the Hessian-vector products (default: the model's)")
    p.add_argument("--mode", choices=("batch_stats", "eval", "train"), default="batch_stats",
                   help="which loss: batch_stats (default: the training loss, normalisation layers use each "
                        "batch's statistics, dropout off), eval (running statistics, for a trained model), "
                        "train (dropout on too; see --dropout-seed)")
    p.add_argument("--dropout-seed", type=int, default=None,
                   help="with --mode train: draw the same dropout masks in every product from this seed")
    p.add_argument("--device", type=_device, default=None,
                   help="where the products run (default: the model's device)")
    p.add_argument("--tol", type=positive_float, default=None,
                   help="relative residual tolerance (default: 1e-6 in float64, 2.4e-4 in float32)")
    p.add_argument("--criterion", choices=("residual", "eigenvalue"), default="residual",
                   help="what --tol bounds: the relative residual (default) or the eigenvalue's estimated relative "
                        "error, which needs fewer products")
    p.add_argument("--seed", type=int, default=0, help="seed of the Lanczos start vector (default 0)")
    p.add_argument("--max-matvecs", type=positive_int, dest="max_matvecs", default=None,
                   help="most Hessian-vector products per eigenvalue (default: the solver's budget)")
    p.add_argument("--no-min", action="store_true", help="skip the smallest eigenvalue")
    p.add_argument("--json", action="store_true", help="strict JSON on stdout")
    p.set_defaults(func=run)


def add_setup_arguments(p, *, lr_help: str) -> None:
    """The model setup and the optimizer whose threshold applies (shared with ``pycurv spectrum``)."""
    p.add_argument("target", nargs="?", default=None,
                   help="SCRIPT.py[:function] or module:function returning model, loss_fn, data[, optimizer] "
                        "(default: a built-in example)")
    p.add_argument("--lr", type=positive_float, default=None, help=lr_help)
    p.add_argument("--optimizer", type=str.lower, choices=_OPTIMIZERS, default=None,
                   help="optimizer whose threshold applies with --lr (default: the returned optimizer's, else sgd)")
    g = p.add_argument_group("optimizer hyper-parameters (override the returned optimizer's, or with --lr)")
    g.add_argument("--momentum", type=coefficient, default=None, help="momentum β (sgd, rmsprop; default 0)")
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (sgd)")
    g.add_argument("--dampening", type=coefficient, default=None, help="dampening d (sgd; default 0)")
    g.add_argument("--weight-decay", type=nonnegative_float, dest="weight_decay", default=None,
                   help="weight decay (sgd, adam: coupled; adamw: decoupled; default 0)")
    g.add_argument("--beta1", type=coefficient, default=None, help="Adam β1 (default 0.9)")
    g.add_argument("--beta2", type=coefficient, default=None, help="Adam β2 (default 0.999; enters P)")
    g.add_argument("--eps", type=nonnegative_float, default=None, help="Adam ε (default 1e-8; enters P)")


def _device(text: str) -> str:
    """argparse type of --device: a torch device this torch can use (checked only where torch is installed)."""
    import argparse

    try:
        import torch
    except ImportError:  # the command itself says torch is missing
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text!r} is not available: {why} (torch {torch.__version__}); "
                                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} does not exist: {torch.cuda.device_count()} CUDA "
                                             "device(s) are visible")
    elif dev.type != "cpu":  # torch.xpu, torch.mps, ...
        backend = getattr(torch, dev.type, None) or getattr(torch.backends, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available to this torch; use --device cpu or cuda")
    return text


# ---------------------------------------------------------------------------
# loading the user's setup


def _load(target: Optional[str]):
    if target is None:
        from .. import _builtin_model

        return _builtin_model.setup(), f"built-in example: {_builtin_model.DESCRIPTION}"
    path, _, func = target.partition(":") if not _is_windows_drive(target) else (target, "", "")
    if path.endswith(".py") or os.path.sep in path or os.path.isfile(path):
        if not os.path.isfile(path):
            raise CliError(f"no such file: {path}")
        files = (path,)
        module = _users(_import_file, path, files=files)
        where = path
    else:
        if not func:
            raise CliError(f"TARGET must be SCRIPT.py, SCRIPT.py:function or module:function, got {target!r}")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            spec = importlib.util.find_spec(path)
        except ImportError as exc:  # a parent package that is missing (or fails, then it is theirs)
            if not isinstance(exc, ModuleNotFoundError) or not path.startswith(str(exc.name)):
                raise UserCodeError(exc) from exc
            spec = None
        if spec is None:
            raise CliError(f"cannot import module {path!r}: no module named {path!r}")
        files = (spec.origin,) if spec.origin and os.path.isfile(spec.origin) else ()
        module = _users(importlib.import_module, path, files=files)  # an ImportError inside it is theirs
        where = path
    name = func or "setup"
    fn = getattr(module, name, None)
    if fn is None and not func and all(hasattr(module, k) for k in ("model", "loss_fn", "data")):
        out = {k: getattr(module, k) for k in ("model", "loss_fn", "data", "optimizer") if hasattr(module, k)}
        return out, target
    if not callable(fn):
        raise CliError(f"{where} defines no function {name}() (and no model, loss_fn, data variables); "
                       "it must return model, loss_fn, data[, optimizer]")
    return _users(fn, files=files), target


def _users(fn, *args, files=()):
    """Runs the user's code: whatever it raises (sys.exit included) is reported as theirs, with their line."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure of their code is theirs, SystemExit too
        raise UserCodeError(exc, files) from exc


def _is_windows_drive(target: str) -> bool:
    return len(target) > 2 and target[1] == ":" and target[2] in "\\/"


def _import_file(path: str):
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)  # the script may import its neighbours, as under `python SCRIPT.py`
    name = "_pycurv_target_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _unpack(obj) -> Dict[str, Any]:
    if isinstance(obj, dict):
        missing = [k for k in ("model", "loss_fn", "data") if k not in obj]
        if missing:
            raise CliError(f"the setup returned a dict without {', '.join(missing)}")
        return {k: obj.get(k) for k in ("model", "loss_fn", "data", "optimizer")}
    if isinstance(obj, (tuple, list)) and len(obj) in (3, 4):
        out = dict(zip(("model", "loss_fn", "data", "optimizer"), obj))
        out.setdefault("optimizer", None)
        return out
    raise CliError(f"the setup must return model, loss_fn, data[, optimizer] (a tuple of 3 or 4, or a dict), "
                   f"got {type(obj).__name__}" + (f" of length {len(obj)}" if hasattr(obj, "__len__") else ""))


# ---------------------------------------------------------------------------
# the measurement


_HP_FLAGS = ("momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps")


def _flag_hyperparameters(args) -> dict:
    return {k: getattr(args, k) for k in _HP_FLAGS if getattr(args, k) is not None}


def _threshold(args, optimizer):
    from ..stability import threshold, threshold_from_optimizer

    flags = _flag_hyperparameters(args)
    if args.lr is not None:
        name = args.optimizer or "sgd"
        hp = {}
        if name in ("adam", "adamw", "rmsprop") and optimizer is not None:
            # the preconditioner comes from the optimizer; its betas/eps too
            base = threshold_from_optimizer(optimizer)
            if base.optimizer != name:
                raise CliError(f"--optimizer {name} needs the setup to return that optimizer (its state is the "
                               f"preconditioner), got {type(optimizer).__name__}")
            hp = {k: v for k, v in base.hyperparameters.items()}
        elif name in ("adam", "adamw", "rmsprop"):
            raise CliError(f"--optimizer {name} bounds the preconditioned sharpness: the setup must return the "
                           f"{name} optimizer (after at least one step) for its preconditioner")
        return threshold(name, args.lr, **{**hp, **flags})
    if optimizer is not None:
        base = threshold_from_optimizer(optimizer)
        return threshold(base.optimizer, base.lr, **{**base.hyperparameters, **flags}) if flags else base
    if args.optimizer is not None:
        raise CliError("--optimizer needs --lr (or an optimizer returned by the setup)")
    if flags:
        raise CliError(f"--{next(iter(flags)).replace('_', '-')} needs --lr (or an optimizer returned by the setup)")
    return None


def _preconditioner_options(thr, optimizer, model, args) -> dict:
    """hessian() options for the preconditioned operator; Adam's P under the flags' β1, β2, ε if given."""
    from .. import torch as pt
    from ..track import operator_options

    opts = operator_options(thr, optimizer)
    what_if = {k: getattr(args, k) for k in ("beta1", "beta2", "eps") if getattr(args, k) is not None}
    if what_if and thr.optimizer == "rmsprop":
        raise CliError("--beta1, --beta2 and --eps are Adam's; RMSprop's preconditioner is read from its state as it is")
    if what_if:
        params = [p for p in model.parameters() if p.requires_grad]
        opts["preconditioner"] = pt.adam_preconditioner(optimizer, params, **what_if)
    return opts


def _solve(op, which: str, args):
    from .._progress import measure_top

    res = measure_top(op, tol=args.tol, seed=args.seed, which=which, max_matvecs=args.max_matvecs,
                      label="λ1" if which == "LA" else "λmin", criterion=args.criterion)
    return res


def _verdict(margin: float) -> str:
    if margin > 1.0:
        return "unstable"
    if margin >= 0.9:
        return "stable, at the edge"
    return "stable"


def _describe_optimizer(thr) -> str:
    hp = thr.hyperparameters
    if thr.optimizer == "sgd":
        extra = []
        if hp.get("momentum"):
            extra.append(f"momentum={hp['momentum']:g}")
        if hp.get("dampening"):
            extra.append(f"dampening={hp['dampening']:g}")
        if hp.get("nesterov"):
            extra.append("nesterov=True")
        if hp.get("weight_decay"):
            extra.append(f"weight_decay={hp['weight_decay']:g}")
        return "SGD(" + ", ".join([f"lr={thr.lr:g}"] + extra) + ")"
    if thr.optimizer in ("adam", "adamw"):
        name = "Adam" if thr.optimizer == "adam" else "AdamW"
        return f"{name}(lr={thr.lr:g}, betas=({hp['beta1']:g}, {hp['beta2']:g}), eps={hp['eps']:g})"
    return f"RMSprop(lr={thr.lr:g}, alpha={hp['alpha']:g}, momentum={hp['momentum']:g})"


def run(args) -> int:
    from .._optional import require

    require("torch", "pycurv sharpness")
    import torch

    from .. import noise
    from .. import torch as pt
    from ..stability import format_number, margin_report, max_stable_lr

    t_start = time.perf_counter()
    if args.target is None:
        # The built-in model is tiny: threads only add synchronisation.
        torch.set_num_threads(1)
    raw, label = _load(args.target)
    setup = _unpack(raw)
    model, loss_fn, data, optimizer = setup["model"], setup["loss_fn"], setup["data"], setup["optimizer"]
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"the setup's model must be a torch.nn.Module, got {type(model).__name__}")
    thr = _threshold(args, optimizer)

    if args.dropout_seed is not None and args.mode != "train":
        raise CliError(f"--dropout-seed seeds dropout masks, which only --mode train draws (got --mode {args.mode})")
    kw = dict(mode=args.mode, microbatch_size=args.microbatch_size, device=args.device, seed=args.dropout_seed)
    if args.dtype != "model":
        kw["dtype"] = args.dtype
    H = pt.hessian(model, loss_fn, data, **kw)
    top = _solve(H, "LA", args)
    lam1 = float(top.eigenvalues[0])
    bottom = None if args.no_min else _solve(H, "SA", args)

    pre = None
    if thr is not None and thr.quantity == "preconditioned_sharpness":
        Hp = pt.hessian(model, loss_fn, data, **kw, **_preconditioner_options(thr, optimizer, model, args))
        pre = _solve(Hp, "LA", args)
    value = float(pre.eigenvalues[0]) if pre is not None else lam1
    rep = margin_report(value, thr, function=H.function) if thr is not None else None

    usual = {
        "SGD": max_stable_lr("sgd", max(lam1, 0.0)),
        "SGD, momentum 0.9": max_stable_lr("sgd", max(lam1, 0.0), momentum=0.9),
        "SGD, Nesterov 0.9": max_stable_lr("sgd", max(lam1, 0.0), momentum=0.9, nesterov=True),
    }
    if pre is not None and thr is not None:
        usual[_describe_optimizer(thr).split("(")[0] + " (preconditioned)"] = thr.max_stable_lr(max(value, 0.0))

    noisy = None
    if args.batch_size is not None:
        n_total = H.n_samples
        if args.batch_size >= n_total:
            raise CliError(f"--batch-size must be smaller than the data set ({n_total} samples), got {args.batch_size}")
        micro = args.microbatch_size or args.batch_size
        Hm = pt.hessian(model, loss_fn, data, **{**kw, "microbatch_size": micro}, check_determinism=False)
        cv = noise.curvature_variance(Hm, top.eigenvectors[:, 0])
        sgd_hp = {}
        if thr is not None and thr.optimizer == "sgd":
            sgd_hp = {k: thr.hyperparameters[k] for k in ("momentum", "dampening", "nesterov", "weight_decay")
                      if k in thr.hyperparameters}
        noisy = {"batch_size": args.batch_size, "dataset_size": cv.n_samples, "microbatch_size": micro,
                 "curvature_variance": cv.variance, "mean_curvature": cv.sharpness,
                 "max_lr": cv.max_lr(args.batch_size, **sgd_hp), "sgd_hyperparameters": sgd_hp}

    n_params = H.shape[0]
    out = {
        "target": label,
        "n_parameters": n_params,
        "dtype": H.dtype,
        "device": H.device,
        "mode": H.mode,
        "function": H.function,
        "hvp_method": H.hvp_method,
        "n_samples": H.n_samples,
        "loss": H.loss(),
        "lambda_max": _solve_record(top),
        "lambda_min": None if bottom is None else _solve_record(bottom),
        "preconditioned_lambda_max": None if pre is None else _solve_record(pre),
        "optimizer": None if thr is None else {"name": thr.optimizer, "lr": thr.lr,
                                                "hyperparameters": dict(thr.hyperparameters)},
        "threshold": None if thr is None else {"value": thr.max_stable_sharpness, "formula": thr.formula,
                                               "quantity": thr.quantity},
        "margin": None if rep is None else rep.margin,
        "stable": None if rep is None else rep.stable,
        "verdict": None if rep is None else _verdict(rep.margin),
        "advice": None if rep is None or not rep.advice else rep.advice,
        "max_stable_lr": usual,
        "noisy_sgd": noisy,
        "seconds": time.perf_counter() - t_start,
    }
    if args.json:
        emit_json(out)
        return 0

    w = sys.stdout.write
    fmt = format_number
    w(f"pycurv sharpness: {label}\n")
    w(f"  parameters      {n_params:,} ({H.dtype}, {H.device}), {H.n_samples:,} samples\n")
    w(f"  function        {H.function}\n")
    w(f"  loss            {out['loss']:.4g}\n")
    w(f"  λ1 (sharpness)  {fmt(lam1)}{_flag(top)}\n")
    if bottom is not None:
        w(f"  λmin            {fmt(float(bottom.eigenvalues[0]))}{_flag(bottom)}\n")
    if pre is not None:
        w(f"  λ1(P⁻¹H)        {fmt(value)}{_flag(pre)}  (preconditioned by the optimizer's state)\n")
    if thr is not None:
        w(f"  optimizer       {_describe_optimizer(thr)}\n")
        w(f"  verdict         {_verdict(rep.margin)}: {rep.text}\n")
        if rep.advice:
            w(_wrap(rep.advice, "  what to do      "))
    else:
        w("  verdict         no optimizer given: pass --lr (and --momentum), or return the optimizer\n")
    w("  largest stable learning rate at this curvature:\n")
    width = max(len(k) for k in usual)
    for k, v in usual.items():
        w(f"    {k:<{width}}  {fmt(v)}\n")
    if noisy is not None:
        w(f"  SGD with batch size {noisy['batch_size']} of {noisy['dataset_size']:,} samples (Wu et al. 2018):\n")
        w(f"    curvature variance s²  {fmt(noisy['curvature_variance'])}  (microbatches of {noisy['microbatch_size']})\n")
        judged = ""
        if thr is not None and thr.optimizer == "sgd":
            judged = f"  (lr {thr.lr:g}: {'stable' if thr.lr <= noisy['max_lr'] else 'unstable'})"
        w(f"    largest stable lr      {fmt(noisy['max_lr'])}{judged}\n")
    return 0


def _wrap(text: str, head: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100, initial_indent=head, subsequent_indent=" " * len(head)) + "\n"


def _flag(res) -> str:
    return "" if res.converged else f"  (not converged: {res.status})"


def _solve_record(res) -> dict:
    return {"value": float(res.eigenvalues[0]), "converged": bool(res.converged), "status": res.status,
            "matvecs": int(res.n_matvecs), "residual": float(res.residual_norms[0]),
            "error_estimate": float(res.error_bounds[0]), "criterion": res.criterion, "tol": float(res.tol),
            "seconds": float(res.time_total)}
