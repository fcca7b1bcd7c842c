"""Batches of PyTorch data: nested tensors, their sample counts, microbatches, call conventions."""

from __future__ import annotations

from typing import Optional

import torch


def _is_tensor_like(x) -> bool:
    return isinstance(x, torch.Tensor) or isinstance(x, dict)


def _is_pair(data) -> bool:
    """An ``(inputs, targets)`` pair: a 2-tuple/list whose first item is a tensor or a dict of inputs."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and _is_tensor_like(data[0])


def _map(x, fn):
    """Applies fn to every tensor in a nested tuple/list/dict."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map(v, fn) for v in x)
    return x


def _leading(x) -> Optional[int]:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            n = _leading(v)
            if n is not None:
                return n
    return None


def _split(x, size: int):
    """Splits every tensor of a nested structure along dim 0 into chunks of ``size``."""
    n = _leading(x)
    if n is None:
        return [x]
    starts = range(0, n, size)
    return [_map(x, lambda t, s=s: t[s:s + size] if t.dim() > 0 and t.shape[0] == n else t) for s in starts]


def _call_args(inputs):
    """How inputs are passed to the model: a tensor as one argument, a dict as keywords."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}
