"""Stability models: when does an optimizer blow up on a quadratic, given the sharpness?

- :mod:`.quadratic` — closed forms for GD/SGD, heavy-ball, EMA and Nesterov momentum,
  dampening, RMSprop and Adam/AdamW with a frozen preconditioner (PyTorch conventions):
  :func:`threshold`, :func:`max_stable_lr`, :func:`threshold_from_optimizer`,
  :func:`iteration_matrix`.
- :mod:`.iteration` — the general routine: thresholds from the spectral radius of any
  per-eigenvalue iteration matrix, in λ or in η.
- :mod:`.noisy` — mean-square stability of minibatch SGD (Wu et al. 2018), solvable for
  η, B, the sharpness or the curvature variance, momentum included.
- :mod:`.nqm` — the noisy quadratic model (Zhang et al. 2019): steps to a target,
  best learning rate per batch size, critical batch size, Gilmer et al.'s §6.
- :mod:`.noise_scale` — the gradient noise scale B_simple = tr(Σ)/‖G‖².
- :mod:`.margin` — "λ1 is at 0.93 of 2/η".

Numbers only: NumPy is the one dependency.
"""

from __future__ import annotations

from .iteration import (
    is_stable,
    largest_stable_lr,
    largest_stable_sharpness,
    largest_stable_value,
    spectral_radius,
)
from .margin import MarginReport, format_number, margin_report, unstable_advice
from .noise_scale import noise_scale_from_batch_norms, noise_scale_from_gradients, simple_noise_scale
from .noisy import (
    is_mean_square_stable,
    mean_square_radius,
    minibatch_variance_factor,
    noisy_sgd_max_curvature_variance,
    noisy_sgd_max_lr,
    noisy_sgd_max_sharpness,
    noisy_sgd_min_batch_size,
    noisy_sgd_sharpness_range,
    second_moment_operator,
    solve_noisy_sgd,
)
from .nqm import (
    BatchScaling,
    NoisyQuadraticModel,
    curvature_batch_scaling,
    nqm_batch_scaling,
    nqm_best_lr,
    nqm_critical_batch_size,
    nqm_expected_loss,
    nqm_lr_grid,
    nqm_max_lr,
    nqm_steady_state_loss,
    nqm_steps_to_target,
)
from .quadratic import OPTIMIZERS, Threshold, iteration_matrix, max_stable_lr, threshold, threshold_from_optimizer

__all__ = [
    # quadratic models (closed forms)
    "OPTIMIZERS",
    "Threshold",
    "threshold",
    "max_stable_lr",
    "threshold_from_optimizer",
    "iteration_matrix",
    # margins
    "MarginReport",
    "margin_report",
    "unstable_advice",
    "format_number",
    # the general routine
    "spectral_radius",
    "is_stable",
    "largest_stable_sharpness",
    "largest_stable_lr",
    "largest_stable_value",
    # minibatch SGD (Wu et al. 2018)
    "minibatch_variance_factor",
    "second_moment_operator",
    "mean_square_radius",
    "is_mean_square_stable",
    "noisy_sgd_max_lr",
    "noisy_sgd_sharpness_range",
    "noisy_sgd_max_sharpness",
    "noisy_sgd_min_batch_size",
    "noisy_sgd_max_curvature_variance",
    "solve_noisy_sgd",
    # noisy quadratic model (Zhang et al. 2019)
    "NoisyQuadraticModel",
    "BatchScaling",
    "nqm_expected_loss",
    "nqm_steady_state_loss",
    "nqm_steps_to_target",
    "nqm_max_lr",
    "nqm_lr_grid",
    "nqm_best_lr",
    "nqm_batch_scaling",
    "nqm_critical_batch_size",
    "curvature_batch_scaling",
    # gradient noise scale
    "simple_noise_scale",
    "noise_scale_from_gradients",
    "noise_scale_from_batch_norms",
]
