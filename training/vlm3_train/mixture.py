"""Dataset mixtures: how often each training dataset is drawn.

VLM3 finds that the weighting of the data sources matters as much as their size. A mixture here
is a probability per dataset; the sampler draws, for every training sample, a dataset with those
probabilities and then the next item of that dataset from a per-dataset random permutation
(starting a new permutation when one is used up), so a small dataset with a large weight is
repeated and a large one with a small weight is subsampled.

The draw is a pure function of ``(seed, epoch)``: every process of a multi-GPU run draws the same
sequence (the data loader then shards it), and a resumed run draws exactly what the interrupted
run would have drawn.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

__all__ = ["MIXTURES", "MixtureError", "MixtureSampler", "mixture_weights", "parse_weights"]

MIXTURES = ("uniform", "size", "explicit")


class MixtureError(ValueError):
    """An invalid mixture specification."""


def parse_weights(text: str | Sequence[float] | None) -> list[float] | None:
    """``"0.5,0.3,0.2"`` -> ``[0.5, 0.3, 0.2]`` (a sequence is passed through as floats)."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            return [float(w) for w in text.split(",") if w.strip()]
        except ValueError:
            raise MixtureError(f"weights must be comma-separated numbers, got {text!r}") from None
    return [float(w) for w in text]


def mixture_weights(sizes: Sequence[int], mixture: str = "size", weights: Sequence[float] | None = None) -> np.ndarray:
    """Probability of drawing each dataset.

    Args:
        sizes: number of items of each dataset (all > 0).
        mixture: ``uniform`` (every dataset equally often), ``size`` (in proportion to its size, as
            plain concatenation would) or ``explicit`` (``weights``, normalised to sum 1).
        weights: one non-negative weight per dataset for ``explicit``; not allowed otherwise.
    """
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise MixtureError("a mixture needs at least one dataset")
    empty = [i for i, s in enumerate(sizes) if s <= 0]
    if empty:
        raise MixtureError(f"dataset(s) {empty} have no training items")
    if mixture not in MIXTURES:
        raise MixtureError(f"unknown mixture {mixture!r}; choose one of {MIXTURES}")
    if mixture != "explicit" and weights is not None:
        raise MixtureError(f"weights are only used with --mixture explicit, not {mixture!r}")
    if mixture == "uniform":
        w = np.ones(len(sizes))
    elif mixture == "size":
        w = np.asarray(sizes, dtype=float)
    else:
        if weights is None:
            raise MixtureError("--mixture explicit needs --weights (one per dataset)")
        w = np.asarray(list(weights), dtype=float)
        if w.shape != (len(sizes),):
            raise MixtureError(f"got {w.size} weights for {len(sizes)} datasets")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise MixtureError(f"weights must be finite and non-negative, got {list(weights)}")
        if w.sum() <= 0:
            raise MixtureError(f"weights must not all be zero, got {list(weights)}")
    return w / w.sum()


class MixtureSampler:
    """Indices into the concatenation of several datasets, drawn with mixture probabilities.

    Yields ``num_samples`` global indices per epoch; an index encodes the epoch as well
    (``epoch * total + i`` with ``i`` the position in the concatenation), so the dataset can vary
    per-epoch details (question order) deterministically. Decode with :meth:`decode`.
    """

    def __init__(self, sizes: Sequence[int], probabilities: Sequence[float], *, num_samples: int | None = None, seed: int = 0) -> None:
        self.sizes = np.asarray([int(s) for s in sizes], dtype=np.int64)
        self.probabilities = np.asarray(probabilities, dtype=float)
        if self.probabilities.shape != self.sizes.shape:
            raise MixtureError(f"{self.probabilities.size} probabilities for {self.sizes.size} datasets")
        if np.any(self.sizes <= 0):
            raise MixtureError(f"every dataset needs items, sizes are {self.sizes.tolist()}")
        if not np.isclose(self.probabilities.sum(), 1.0) or np.any(self.probabilities < 0):
            raise MixtureError(f"probabilities must be non-negative and sum to 1, got {self.probabilities.tolist()}")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.total = int(self.sizes.sum())
        self.num_samples = int(num_samples) if num_samples is not None else self.total
        if self.num_samples < 1:
            raise MixtureError(f"num_samples must be >= 1, got {self.num_samples}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next iteration yields (called by the trainer)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def draw(self, epoch: int) -> np.ndarray:
        """The global positions (into the concatenation) drawn for ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        choice = rng.choice(len(self.sizes), size=self.num_samples, p=self.probabilities)
        out = np.empty(self.num_samples, dtype=np.int64)
        for d, size in enumerate(self.sizes):
            slots = np.flatnonzero(choice == d)
            if slots.size == 0:
                continue
            rounds = -(-slots.size // int(size))
            order = np.concatenate([rng.permutation(int(size)) for _ in range(rounds)])[: slots.size]
            out[slots] = self.offsets[d] + order
        return out

    def dataset_of(self, positions: np.ndarray) -> np.ndarray:
        """Which dataset each global position belongs to."""
        return np.searchsorted(self.offsets, np.asarray(positions) % self.total, side="right") - 1

    def decode(self, index: int) -> tuple[int, int]:
        """``(epoch, position)`` of an index yielded by this sampler."""
        return divmod(int(index), self.total)

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.total
        return iter((base + self.draw(self.epoch)).tolist())
