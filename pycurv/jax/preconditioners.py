"""Adam's preconditioner from an optax state, for the preconditioned sharpness λ1(P^{-1/2} H P^{-1/2})."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["adam_preconditioner", "find_adam_state", "find_hyperparams"]


def find_adam_state(opt_state):
    """The first node of an optax state with ``nu`` and ``count`` (``ScaleByAdamState``), and its hyper-parameters.

    Searches tuples, lists, dicts and ``inner_state`` fields (``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.MultiSteps``). Returns
    ``(state, hyperparams)``, ``hyperparams`` the dict recorded by
    ``optax.inject_hyperparams`` or None.
    """

    def search(node, hp):
        if hasattr(node, "nu") and hasattr(node, "count"):
            return node, hp
        if hasattr(node, "hyperparams") and isinstance(getattr(node, "hyperparams"), dict):
            hp = dict(node.hyperparams)
        children = []
        if hasattr(node, "inner_state"):
            children.append(node.inner_state)
        if isinstance(node, dict):
            children.extend(node.values())
        elif isinstance(node, (tuple, list)):
            children.extend(node)
        for c in children:
            found = search(c, hp)
            if found is not None:
                return found
        return None

    found = search(opt_state, None)
    if found is None:
        raise TypeError(
            f"no Adam state (a node with fields 'nu' and 'count', e.g. optax.ScaleByAdamState) in the "
            f"{type(opt_state).__name__} passed as preconditioner"
        )
    return found


def find_hyperparams(opt_state) -> Optional[dict]:
    """The ``hyperparams`` dict that ``optax.inject_hyperparams`` keeps in its state, or None."""
    if hasattr(opt_state, "hyperparams") and isinstance(getattr(opt_state, "hyperparams"), dict):
        return dict(opt_state.hyperparams)
    children = []
    if hasattr(opt_state, "inner_state"):
        children.append(opt_state.inner_state)
    if isinstance(opt_state, dict):
        children.extend(opt_state.values())
    elif isinstance(opt_state, (tuple, list)):
        children.extend(opt_state)
    for c in children:
        found = find_hyperparams(c)
        if found is not None:
            return found
    return None


def adam_preconditioner(opt_state, *, b1: Optional[float] = None, b2: Optional[float] = None,
                        eps: Optional[float] = None, eps_root: Optional[float] = None):
    """Adam's preconditioner P = (1 - b1^t) * (sqrt(nu / (1 - b2^t) + eps_root) + eps), flat.

    ``nu`` and ``count`` (= t) are read from the optax state (``optax.adam``,
    ``optax.adamw``, also inside ``optax.chain`` / ``inject_hyperparams``); b1, b2,
    eps and eps_root from ``inject_hyperparams`` when it recorded them, otherwise
    they must be given (optax's state does not store them). Flattened in
    ``ravel_pytree`` order, matching :func:`hessian`'s vector when ``nu`` has the
    structure of ``params``. Compare the top eigenvalue of P^{-1/2} H P^{-1/2} with
    (2 + 2 b1) / ((1 - b1) lr) = 38 / lr at b1 = 0.9 (Cohen et al. 2022).
    """
    state, hp = find_adam_state(opt_state)
    hp = hp or {}
    values = {}
    for name, given in (("b1", b1), ("b2", b2), ("eps", eps), ("eps_root", eps_root)):
        if given is not None:
            values[name] = float(given)
        elif name in hp:
            values[name] = float(np.asarray(hp[name]))
        elif name == "eps_root":
            values[name] = 0.0
        else:
            raise ValueError(
                f"the optax state does not record Adam's {name}; pass it: "
                "pycurv.jax.adam_preconditioner(opt_state, b1=0.9, b2=0.999, eps=1e-8) (your values), "
                "or build the optimizer with optax.inject_hyperparams"
            )
    t = int(np.asarray(state.count))
    if t < 1:
        raise ValueError("the optax Adam state has count=0: the optimizer has taken no step yet; Adam's "
                         "preconditioner exists after the first update")
    nu, _ = ravel_pytree(state.nu)
    b1_, b2_ = values["b1"], values["b2"]
    v_hat = nu / (1.0 - b2_**t)
    return (1.0 - b1_**t) * (jnp.sqrt(v_hat + values["eps_root"]) + values["eps"])


def _preconditioner_diagonal(pre, params, n: int):
    if isinstance(pre, (np.ndarray, jax.Array)):
        P = jnp.asarray(pre).reshape(-1)
    else:
        state, _ = find_adam_state(pre)
        if jax.tree_util.tree_structure(state.nu) != jax.tree_util.tree_structure(params):
            raise ValueError("the Adam state's nu does not have the structure of params; pass the state of "
                             "the optimizer that trains these params")
        P = adam_preconditioner(pre)
    if P.shape != (n,):
        raise ValueError(f"preconditioner diagonal must have {n} entries (one per parameter), got {P.shape[0]}")
    ok = np.isfinite(np.asarray(P)) & (np.asarray(P) > 0)
    if not ok.all():
        raise ValueError(f"the preconditioner diagonal must be finite and > 0; {int((~ok).sum())} entries are not")
    return P
