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


# ---------------------------------------------------------------------------
# a DataLoader replayed with the same batches in every pass


def _generators(loader):
    """The ``torch.Generator`` objects that drawing one epoch of ``loader``'s indices advances."""
    found = []
    for obj in (loader, loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


class FrozenLoader:
    """One epoch of a ``DataLoader``'s batches, drawn once and replayed in every pass.

    With batch statistics the loss depends on which samples share a batch, so a
    shuffled loader would be a different function at every Hessian-vector
    product. The indices of the epoch the loader would draw next are taken from
    its sampler when the operator is built (the global RNG and the sampler's own
    generator are restored afterwards: the user's loader is neither iterated
    nor changed), and a loader over the same dataset replays exactly those
    batches. Each pass runs under a forked torch RNG seeded with ``seed`` (the
    worker seeds) and ``seed + 1 + i`` (batch i), so random augmentations that
    draw from torch's RNG are the same in every pass too.

    Attributes
    ----------
    batch_indices : list of lists of int
        The samples of each batch, in order (``None`` entries for a loader
        without automatic batching hold one dataset index each).
    shuffled : bool
        Whether the user's loader draws a new order every epoch (its sampler is random).
    """

    def __init__(self, loader, seed: int = 0):
        DataLoader = torch.utils.data.DataLoader
        self.seed = int(seed)
        self.shuffled = isinstance(loader.sampler, (torch.utils.data.RandomSampler,
                                                    torch.utils.data.SubsetRandomSampler,
                                                    torch.utils.data.WeightedRandomSampler))
        gens = _generators(loader)
        states = [g.get_state() for g in gens]
        try:
            with torch.random.fork_rng(devices=[]):
                # A DataLoader's iterator draws its workers' base seed before the sampler's first
                # draw: drawn here too, the indices are those of the epoch the loader yields next.
                torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
                if loader.batch_sampler is not None:
                    self.batch_indices = [list(b) for b in loader.batch_sampler]
                else:
                    self.batch_indices = [i for i in loader.sampler]
        finally:
            for g, s in zip(gens, states):
                g.set_state(s)
        options = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                       timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                       multiprocessing_context=loader.multiprocessing_context,
                       persistent_workers=loader.persistent_workers)
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        if loader.batch_sampler is not None:
            self._loader = DataLoader(loader.dataset, batch_sampler=self.batch_indices, **options)
        else:
            self._loader = DataLoader(loader.dataset, batch_size=None, sampler=self.batch_indices, **options)

    def __len__(self) -> int:
        return len(self.batch_indices)

    def __iter__(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            it = iter(self._loader)
        i = 0
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 1 + i)
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch
            i += 1


def fixed_batches(data):
    """``data`` with a ``DataLoader`` over a map-style dataset replaced by a :class:`FrozenLoader`.

    Lists and single batches are fixed already; an ``IterableDataset`` cannot be
    replayed by index and is passed on (the determinism probe judges it).
    """
    loader_type = torch.utils.data.DataLoader
    if isinstance(data, loader_type) and not isinstance(data.dataset, torch.utils.data.IterableDataset):
        return FrozenLoader(data)
    return data
