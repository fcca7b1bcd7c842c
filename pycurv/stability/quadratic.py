"""Largest stable sharpness and learning rate of GD, SGD with momentum, Nesterov, RMSProp and Adam.

Model: a quadratic loss ½ θᵀHθ, deterministic gradients, hyper-parameters fixed.
Along an eigenvector of H with eigenvalue λ each optimizer is a linear recurrence
``x_{t+1} = M(λ, η) x_t`` (see :func:`iteration_matrix`); it is stable iff the
spectral radius ρ(M) ≤ 1 (ρ = 1, marginal, counts as stable). Every optimizer
here has a closed form ``λ ≤ A/η − B``, derived from the Jury conditions of
M's characteristic polynomial and tested against the spectral-radius search of
:mod:`pycurv.stability.iteration` and against simulations of the update rules.

Conventions are PyTorch's ``torch.optim`` update rules (matrices in :func:`iteration_matrix`):

======================  ==========================================  =====================================
optimizer               recurrence on a gradient g                  stable iff
======================  ==========================================  =====================================
SGD                     θ ← θ − η g                                 λ1 ≤ 2/η
SGD, momentum β         b ← βb + g;  θ ← θ − η b   (heavy ball)     λ1 ≤ (2 + 2β)/η
SGD, dampening d        b ← βb + (1 − d) g                          λ1 ≤ (2 + 2β)/((1 − d)η)
EMA momentum (d = β)    m ← βm + (1 − β) g;  θ ← θ − η m            λ1 ≤ (2 + 2β)/((1 − β)η)
Nesterov                b ← βb + g;  θ ← θ − η (g + βb)             λ1 ≤ (2 + 2β)/((1 + 2β)η)
RMSprop, momentum β     b ← βb + g/(√v + ε);  θ ← θ − η b           λ1(P^-1/2 H P^-1/2) ≤ (2 + 2β)/η
Adam / AdamW            m ← β1 m + (1 − β1) g;  θ ← θ − η P^-1 m    λ1(P^-1/2 H P^-1/2) ≤ (2 + 2β1)/((1 − β1)η)
======================  ==========================================  =====================================

For Adam and AdamW the preconditioner is frozen: P = (1 − β1^t)·diag(√v̂_t + ε)
with v̂_t = v_t/(1 − β2^t) (Kalra & Barkeshli 2024, §2; Cohen et al. 2022), which is
exactly PyTorch's step ``θ ← θ − (η/(1 − β1^t))·m/(√v̂ + ε)`` with v and t held
fixed. For RMSprop P = diag(√v + ε) (no bias correction; with ``centered=True``
v is replaced by v − ḡ²). The threshold then bounds the *preconditioned
sharpness* λ1(P^{-1/2} H P^{-1/2}) = λ1(P^{-1} H); β2, ε, α and t enter only through
P, which the caller measures (38/η at β1 = 0.9, Cohen et al. 2022).

Weight decay: SGD's (coupled, g ← g + wd·θ) shifts every curvature by wd, so the
bound on λ1 is lowered by wd. AdamW's decoupled decay θ ← (1 − η·wd)θ gives
λ1(P^{-1}H) ≤ (2 − η·wd)(1 + β1)/((1 − β1)η). Adam's and RMSprop's coupled decay
is part of the gradient that P divides, so their bound is on λ1(P^{-1}(H + wd·I))
and its value does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .._checks import as_real, check_coefficient, check_flag, check_lr, check_nonnegative

__all__ = [
    "OPTIMIZERS",
    "Threshold",
    "threshold",
    "max_stable_lr",
    "iteration_matrix",
    "threshold_from_optimizer",
]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")

SHARPNESS = "sharpness"
PRECONDITIONED = "preconditioned_sharpness"

# Hyper-parameters each optimizer takes, with PyTorch's defaults (AdamW's weight decay
# defaults to 0 here, not PyTorch's 0.01, so that the bound is the textbook one unless
# asked; threshold_from_optimizer reads the real value).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
    "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
    "rmsprop": {"alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0, "centered": False},
}


@dataclass(frozen=True)
class Threshold:
    """The largest stable value of a curvature quantity for one optimizer configuration.

    Attributes
    ----------
    optimizer : str
        ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``.
    lr : float
        Learning rate η.
    max_stable_sharpness : float
        Largest stable value of ``quantity`` (same units as the Hessian's eigenvalues,
        i.e. loss per parameter²). Training is stable while the measured value is ≤ this.
    quantity : str
        ``"sharpness"`` (λ1 of H) or ``"preconditioned_sharpness"`` (λ1 of P^{-1/2} H P^{-1/2}).
    formula : str
        The closed form, e.g. ``"2/η"``, ``"(2 + 2β)/η"``, ``"38/η"``.
    hyperparameters : dict
        Every hyper-parameter of the model, defaults filled in.
    model : str
        The recurrence in words (which momentum form, which preconditioner).
    """

    optimizer: str
    lr: float
    max_stable_sharpness: float
    quantity: str
    formula: str
    hyperparameters: Mapping[str, Any] = field(hash=False)
    model: str = ""

    @property
    def symbol(self) -> str:
        """How the bounded quantity is written: ``λ1`` or ``λ1(P⁻¹H)``."""
        return "λ1" if self.quantity == SHARPNESS else "λ1(P⁻¹H)"

    def max_stable_lr(self, sharpness) -> float:
        """Largest stable learning rate for a measured value of ``quantity``, same hyper-parameters."""
        return max_stable_lr(self.optimizer, sharpness, **self.hyperparameters)

    def __str__(self) -> str:
        return (f"{self.symbol} ≤ {self.formula} = {self.max_stable_sharpness:.6g} "
                f"({self.optimizer}, lr={self.lr:g})")


# --- resolving names and hyper-parameters --------------------------------------------------------


def _canonical(optimizer) -> str:
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a string such as 'sgd', got optimizer={optimizer!r}")
    name = optimizer.strip().lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    return name


def _resolve(optimizer, given: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Canonical name and validated hyper-parameters (defaults filled in)."""
    name = _canonical(optimizer)
    given = dict(given)
    betas = given.pop("betas", None)
    if betas is not None:
        if name not in ("adam", "adamw"):
            raise ValueError(f"betas does not apply to {name}")
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got betas={betas!r}") from None
        for key, val in (("beta1", b1), ("beta2", b2)):
            if given.get(key) is not None:
                raise ValueError(f"give either betas or {key}, not both")
            given[key] = val
    allowed = _DEFAULTS[name]
    hp = dict(allowed)
    for key, val in given.items():
        if val is None:
            continue
        if key not in allowed:
            raise ValueError(f"{key} does not apply to {name} (its hyper-parameters: {', '.join(allowed)})")
        hp[key] = val
    for key in ("momentum", "dampening", "beta1", "beta2", "alpha"):
        if key in hp:
            hp[key] = check_coefficient(key, hp[key])
    for key in ("weight_decay", "eps"):
        if key in hp:
            hp[key] = check_nonnegative(key, hp[key])
    for key in ("nesterov", "amsgrad", "centered"):
        if key in hp:
            hp[key] = check_flag(key, hp[key])
    if name == "sgd" and hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        # PyTorch refuses this combination too.
        raise ValueError("nesterov requires momentum > 0 and dampening = 0, "
                         f"got momentum={hp['momentum']}, dampening={hp['dampening']}")
    return name, hp


# --- closed forms: the bound is A/η − B -----------------------------------------------------------


def _rule(name: str, hp: Mapping[str, Any]) -> tuple[float, float, str, str, str]:
    """(A, B, formula, quantity, model) with max stable quantity = A/η − B."""
    if name == "sgd":
        beta, d, wd = hp["momentum"], hp["dampening"], hp["weight_decay"]
        if beta == 0.0:
            a, formula = 2.0, "2/η"
            model = "SGD without momentum: θ ← θ − η g"
        elif hp["nesterov"]:
            a, formula = (2.0 + 2.0 * beta) / (1.0 + 2.0 * beta), "(2 + 2β)/((1 + 2β)η)"
            model = "SGD with Nesterov momentum (PyTorch nesterov=True): b ← βb + g, θ ← θ − η(g + βb)"
        elif d == 0.0:
            a, formula = 2.0 + 2.0 * beta, "(2 + 2β)/η"
            model = "SGD with heavy-ball momentum (PyTorch): b ← βb + g, θ ← θ − ηb"
        elif d == beta:
            a, formula = (2.0 + 2.0 * beta) / (1.0 - beta), "(2 + 2β)/((1 − β)η)"
            model = "SGD with EMA momentum (PyTorch dampening = momentum): m ← βm + (1 − β)g, θ ← θ − ηm"
        else:
            a, formula = (2.0 + 2.0 * beta) / (1.0 - d), "(2 + 2β)/((1 − d)η)"
            model = "SGD with dampened momentum (PyTorch): b ← βb + (1 − d)g, θ ← θ − ηb"
        if wd:
            formula += " − wd"
            model += "; coupled weight decay g ← g + wd·θ"
        return a, wd, formula, SHARPNESS, model
    if name in ("adam", "adamw"):
        b1, wd = hp["beta1"], hp["weight_decay"]
        k = (1.0 + b1) / (1.0 - b1)
        formula = "38/η" if b1 == 0.9 else "(2 + 2β1)/((1 − β1)η)"
        label = "Adam" if name == "adam" else "AdamW"
        model = (f"{label} with a frozen preconditioner P = (1 − β1^t)·diag(√v̂ + ε): "
                 "m ← β1 m + (1 − β1)g, θ ← θ − η P⁻¹m")
        b = 0.0
        if wd and name == "adamw":
            b = k * wd
            formula += " − 19·wd" if b1 == 0.9 else " − wd(1 + β1)/(1 − β1)"
            model += "; decoupled weight decay θ ← (1 − η·wd)θ"
        elif wd:
            model += "; coupled weight decay: the bound is on λ1(P⁻¹(H + wd·I))"
        return 2.0 * k, b, formula, PRECONDITIONED, model
    # rmsprop
    mu = hp["momentum"]
    root = "√(v − ḡ²)" if hp["centered"] else "√v"
    model = f"RMSprop with a frozen preconditioner P = diag({root} + ε): "
    if mu == 0.0:
        a, formula = 2.0, "2/η"
        model += "θ ← θ − η P⁻¹g"
    else:
        a, formula = 2.0 + 2.0 * mu, "(2 + 2β)/η"
        model += "b ← βb + P⁻¹g, θ ← θ − ηb (β = momentum)"
    if hp["weight_decay"]:
        model += "; coupled weight decay: the bound is on λ1(P⁻¹(H + wd·I))"
    return a, 0.0, formula, PRECONDITIONED, model


def threshold(optimizer: str, lr, *, momentum=None, dampening=None, nesterov=None,
              weight_decay=None, beta1=None, beta2=None, betas=None, eps=None, alpha=None,
              centered=None, amsgrad=None) -> Threshold:
    """Largest stable sharpness (or preconditioned sharpness) at learning rate ``lr``.

    Parameters
    ----------
    optimizer : {"sgd", "adam", "adamw", "rmsprop"}
        Case-insensitive. EMA momentum is ``"sgd"`` with ``dampening=momentum``.
    lr : float
        Learning rate η > 0 (a 0-d array or tensor is read with ``float()``).
    momentum, dampening, nesterov, weight_decay
        SGD's (and RMSprop's ``momentum``, ``weight_decay``), PyTorch's meaning and defaults.
    beta1, beta2 (or betas), eps, amsgrad
        Adam/AdamW's. Only β1 changes the bound; β2, ε, amsgrad shape P and are recorded.
    alpha, centered, eps
        RMSprop's; they shape P and are recorded.

    Returns
    -------
    Threshold
        ``max_stable_sharpness`` = A/η − B for the optimizer's closed form (module
        docstring), ``quantity`` names what it bounds. Examples: ``threshold("sgd", 0.1)``
        gives 20 (2/η); ``threshold("sgd", 0.1, momentum=0.9)`` gives 38 ((2 + 2β)/η);
        ``threshold("adam", 1e-3)`` gives 38000 (38/η on λ1(P⁻¹H)).

    Hyper-parameters that do not belong to the optimizer raise ValueError.
    """
    lr = check_lr(lr)
    name, hp = _resolve(optimizer, dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                                        weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                                        betas=betas, eps=eps, alpha=alpha, centered=centered,
                                        amsgrad=amsgrad))
    a, b, formula, quantity, model = _rule(name, hp)
    return Threshold(optimizer=name, lr=lr, max_stable_sharpness=a / lr - b, quantity=quantity,
                     formula=formula, hyperparameters=hp, model=model)


def max_stable_lr(optimizer: str, sharpness, **hyperparameters) -> float:
    """Largest stable learning rate for a measured sharpness (or preconditioned sharpness).

    The inverse of :func:`threshold` for the same hyper-parameters: with the bound
    λ ≤ A/η − B it is η_max = A/(λ + B), e.g. 2/λ1 for SGD and 38/λ1(P⁻¹H) for Adam
    at β1 = 0.9. ``sharpness`` must be ≥ 0 (a negative top eigenvalue has no
    step-size instability); at 0 every learning rate is stable and ``math.inf`` is
    returned.
    """
    lam = check_nonnegative("sharpness", sharpness)
    name, hp = _resolve(optimizer, hyperparameters)
    a, b, *_ = _rule(name, hp)
    denom = lam + b
    return a / denom if denom > 0 else math.inf


# --- iteration matrices --------------------------------------------------------------------------


def iteration_matrix(optimizer: str, sharpness, lr, **hyperparameters) -> np.ndarray:
    """The per-eigenvalue iteration matrix M(λ, η) of an optimizer on a quadratic.

    ``sharpness`` is the eigenvalue λ of H (for Adam/AdamW/RMSprop: of
    P^{-1/2} H P^{-1/2}, in the coordinates u = P^{1/2}θ). States and matrices,
    with ℓ = λ + wd for SGD's coupled weight decay (ℓ = λ otherwise):

    - SGD, β = 0: state θ, M = [1 − ηℓ].
    - SGD heavy ball (b ← βb + (1 − d)g, θ ← θ − ηb): state (θ, b),
      M = [[1 − η(1 − d)ℓ, −ηβ], [(1 − d)ℓ, β]].
    - SGD Nesterov (b ← βb + g, θ ← θ − η(g + βb)): state (θ, b),
      M = [[1 − η(1 + β)ℓ, −ηβ²], [ℓ, β]]; trace 1 + β − η(1 + β)ℓ, determinant β(1 − ηℓ),
      so ρ ≤ 1 iff ηℓ ≤ (2 + 2β)/(1 + 2β) (the −1 crossing binds before ``|det| = 1``).
    - Adam/AdamW (m ← β1 m + (1 − β1)g, u ← (1 − η·wd_decoupled)u − η P^{-1/2} m): state (u, n),
      n = P^{-1/2}m, M = [[1 − η·wd − η(1 − β1)λ, −ηβ1], [(1 − β1)λ, β1]], wd = 0 for Adam.
    - RMSprop: as SGD heavy ball with d = 0 (or as SGD when momentum = 0), in u-coordinates.

    PyTorch's first momentum step sets b = g without dampening: a transient that does
    not change stability. Every M is affine in λ, which :mod:`pycurv.stability.noisy`
    uses for minibatch noise.
    """
    lam = as_real("sharpness", sharpness)
    lr = check_lr(lr)
    name, hp = _resolve(optimizer, hyperparameters)
    eta = lr
    if name in ("sgd", "rmsprop"):
        beta = hp["momentum"]
        d = hp.get("dampening", 0.0)
        ell = lam + hp["weight_decay"] if name == "sgd" else lam
        if beta == 0.0:
            return np.array([[1.0 - eta * ell]])
        if hp.get("nesterov", False):
            return np.array([[1.0 - eta * (1.0 + beta) * ell, -eta * beta * beta],
                             [ell, beta]])
        s = 1.0 - d
        return np.array([[1.0 - eta * s * ell, -eta * beta],
                         [s * ell, beta]])
    b1 = hp["beta1"]
    decay = hp["weight_decay"] if name == "adamw" else 0.0
    return np.array([[1.0 - eta * decay - eta * (1.0 - b1) * lam, -eta * b1],
                     [(1.0 - b1) * lam, b1]])


# --- torch.optim objects, read by duck typing ----------------------------------------------------

_TORCH_NAMES = {"sgd": "sgd", "adam": "adam", "adamw": "adamw", "rmsprop": "rmsprop"}


def threshold_from_optimizer(opt, group: int = 0) -> Threshold:
    """The :class:`Threshold` of a ``torch.optim`` SGD, Adam, AdamW or RMSprop instance.

    Reads ``type(opt).__name__`` and ``opt.param_groups[group]`` (``lr``, ``momentum``,
    ``dampening``, ``nesterov``, ``weight_decay``, ``betas``, ``eps``, ``alpha``,
    ``centered``, ``amsgrad``) without importing torch; a tensor learning rate is read
    with ``float()``. Adam with ``decoupled_weight_decay=True`` is treated as AdamW.
    Any other optimizer (LBFGS, Adagrad, ...) raises ValueError.
    """
    kind = type(opt).__name__
    name = _TORCH_NAMES.get(kind.lower())
    if name is None:
        raise ValueError(f"no stability model for optimizer {kind}; supported: SGD, Adam, AdamW, RMSprop")
    groups = getattr(opt, "param_groups", None)
    if groups is None:
        raise ValueError(f"{kind} object has no param_groups; pass a torch.optim optimizer")
    try:
        n_groups = len(groups)
    except TypeError:
        raise ValueError(f"{kind}.param_groups is not a list of dicts") from None
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or not 0 <= group < n_groups:
        raise ValueError(f"group must be an index 0 <= group < {n_groups}, got group={group!r}")
    g: Mapping[str, Any] = groups[group]
    if "lr" not in g:
        raise ValueError(f"param_groups[{group}] of {kind} has no 'lr'")
    hp: dict[str, Any] = {}

    def take(key, cast):
        if key in g and g[key] is not None:
            hp[key] = cast(g[key])

    if name == "sgd":
        take("momentum", float)
        take("dampening", float)
        take("nesterov", bool)
        take("weight_decay", float)
    elif name in ("adam", "adamw"):
        if name == "adam" and g.get("decoupled_weight_decay", False):
            name = "adamw"
        if "betas" in g:
            b1, b2 = g["betas"]
            hp["beta1"], hp["beta2"] = float(b1), float(b2)
        take("eps", float)
        take("weight_decay", float)
        take("amsgrad", bool)
    else:
        take("alpha", float)
        take("eps", float)
        take("momentum", float)
        take("weight_decay", float)
        take("centered", bool)
    lr = as_real("lr", g["lr"])
    return threshold(name, lr, **hp)
