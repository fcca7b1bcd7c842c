"""NumPy re-implementations of torch.optim's update rules (single-tensor code paths), for tests.

Each class follows PyTorch's ``_single_tensor_*`` functions line by line. Adam, AdamW and
RMSprop can freeze their second-moment state (``exp_avg_sq`` / ``square_avg``) and Adam's
``step`` counter, which turns them into the fixed-preconditioner recurrences that the
stability thresholds describe.
"""

from __future__ import annotations

import numpy as np


class SGD:
    def __init__(self, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay
        self.buf = None

    def step(self, param, grad):
        if self.weight_decay != 0:
            grad = grad + self.weight_decay * param
        if self.momentum != 0:
            if self.buf is None:
                self.buf = grad.copy()
            else:
                self.buf = self.buf * self.momentum + (1 - self.dampening) * grad
            if self.nesterov:
                grad = grad + self.momentum * self.buf
            else:
                grad = self.buf
        return param - self.lr * grad


class Adam:
    """torch.optim.Adam / AdamW (``decoupled=True``) with optionally frozen exp_avg_sq and step."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False,
                 exp_avg_sq=None, step=0, freeze=False):
        self.lr, self.beta1, self.beta2, self.eps = lr, betas[0], betas[1], eps
        self.weight_decay, self.decoupled, self.freeze = weight_decay, decoupled, freeze
        self.exp_avg = None
        self.exp_avg_sq = None if exp_avg_sq is None else np.array(exp_avg_sq, dtype=float)
        self.t = step

    def step(self, param, grad):
        if self.exp_avg is None:
            self.exp_avg = np.zeros_like(param)
            if self.exp_avg_sq is None:
                self.exp_avg_sq = np.zeros_like(param)
        if not self.freeze:
            self.t += 1
        if self.weight_decay != 0:
            if self.decoupled:
                param = param * (1 - self.lr * self.weight_decay)
            else:
                grad = grad + self.weight_decay * param
        self.exp_avg = self.exp_avg + (grad - self.exp_avg) * (1 - self.beta1)  # lerp_
        if not self.freeze:
            self.exp_avg_sq = self.exp_avg_sq * self.beta2 + (1 - self.beta2) * grad * grad
        bias_correction1 = 1 - self.beta1 ** self.t
        bias_correction2 = 1 - self.beta2 ** self.t
        step_size = self.lr / bias_correction1
        denom = np.sqrt(self.exp_avg_sq) / bias_correction2 ** 0.5 + self.eps
        return param - step_size * self.exp_avg / denom

    def preconditioner(self):
        """P = (1 − β1^t)·(√v̂ + ε), the diagonal the threshold's preconditioned sharpness uses."""
        v_hat = self.exp_avg_sq / (1 - self.beta2 ** self.t)
        return (1 - self.beta1 ** self.t) * (np.sqrt(v_hat) + self.eps)


class RMSprop:
    def __init__(self, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, square_avg=None,
                 freeze=False):
        self.lr, self.alpha, self.eps = lr, alpha, eps
        self.weight_decay, self.momentum, self.freeze = weight_decay, momentum, freeze
        self.square_avg = None if square_avg is None else np.array(square_avg, dtype=float)
        self.buf = None

    def step(self, param, grad):
        if self.square_avg is None:
            self.square_avg = np.zeros_like(param)
        if self.weight_decay != 0:
            grad = grad + self.weight_decay * param
        if not self.freeze:
            self.square_avg = self.square_avg * self.alpha + (1 - self.alpha) * grad * grad
        avg = np.sqrt(self.square_avg) + self.eps
        if self.momentum > 0:
            if self.buf is None:
                self.buf = np.zeros_like(param)
            self.buf = self.buf * self.momentum + grad / avg
            return param - self.lr * self.buf
        return param - self.lr * grad / avg

    def preconditioner(self):
        return np.sqrt(self.square_avg) + self.eps


def run(opt, hessian, theta0, max_steps, *, tol=1e-3, blowup=1e3):
    """Iterate θ ← opt.step(θ, Hθ); returns (final |θ|/|θ0|, max |θ|/|θ0|, steps run).

    Stops early once |θ| < 1e-3·tol·|θ0| (converged well past ``tol``) or |θ| > 10·blowup·|θ0|.
    """
    theta = np.array(theta0, dtype=float)
    n0 = np.linalg.norm(theta)
    peak = 1.0
    for t in range(1, max_steps + 1):
        theta = opt.step(theta, hessian @ theta)
        r = np.linalg.norm(theta) / n0
        peak = max(peak, r)
        if r < 1e-3 * tol or r > 10 * blowup:
            return r, peak, t
    return r, peak, max_steps
