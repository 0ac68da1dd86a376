"""Weighted mixtures of data sources: `MixturePipeline` draws each sample of a batch from one
of several sources (pipelines read example by example), the source chosen by a counter-based
hash of (seed, global sample position) (`mixture_choices`)."""
from __future__ import annotations

import numpy as np

from mllm_jax.data.collate import collate


def _splitmix64(x):
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mixture_choices(seed: int, positions, weights) -> np.ndarray:
    """The source of each global sample position: a function of (seed, position) alone (a
    counter-based hash, so it does not depend on batch size, process layout or history), drawn
    with probabilities proportional to `weights`."""
    key = _splitmix64(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))
    with np.errstate(over="ignore"):
        z = _splitmix64(key ^ _splitmix64(np.asarray(positions, np.uint64)))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    w = np.asarray(weights, np.float64)
    cdf = np.cumsum(w / w.sum())
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1)


class MixturePipeline:
    """Batches drawn from several sources with given weights, with grain's iterator interface.

    sources: [(source, weight), ...]; a source reads one example at a time, like
    `LlavaPipeline(..., global_batch_size=None)` (next_example, get_state, set_state, and
    mode, max_length, max_images, image_shape, pad_id, process_index, process_count). Sources
    may differ in max_images and max_length (batches take the largest) and may be text-only:
    a row without images has all-zero pixel_values.

    Global sample position g (batch i holds g in [i*B, (i+1)*B)) comes from source
    `mixture_choices(seed, g, weights)`; process p of n fills rows [p*B/n, (p+1)*B/n) of each
    global batch from its own shard of the chosen sources. So the choice of source is fixed by
    (seed, g), batches have fixed shapes, and the state {position, seed, weights, every
    source's state} restores exactly. `last_sources` holds the latest batch's source indices.
    """

    def __init__(self, sources, *, global_batch_size: int, seed: int = 0,
                 return_sample_ids: bool = False):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.sources = [s for s, _ in sources]
        self.weights = [float(w) for _, w in sources]
        if any(not np.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        first = self.sources[0]
        for attr in ("mode", "image_shape", "pad_id", "process_index", "process_count"):
            values = {repr(getattr(s, attr)) for s in self.sources}
            if len(values) > 1:
                raise ValueError(f"mixture sources differ in {attr}: {sorted(values)}")
        self.mode = first.mode
        self.process_index, self.process_count = first.process_index, first.process_count
        if global_batch_size % self.process_count:
            raise ValueError(f"global batch {global_batch_size} does not split over "
                             f"{self.process_count} processes")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.max_length = max(s.max_length for s in self.sources)
        self.max_images = max(s.max_images for s in self.sources)
        self.image_shape, self.pad_id = first.image_shape, first.pad_id
        self.sample_inputs = first.sample_inputs  # the same builder in every source
        self.image_inputs = getattr(first, "image_inputs", None)  # likewise
        self.seq_len = self.max_length
        self.seed = int(seed)
        self.return_sample_ids = return_sample_ids
        self.last_sample_ids, self.last_sources = [], []
        self._position = 0  # global sample position of the next batch

    def __iter__(self):
        return self

    def choices(self, step: int) -> np.ndarray:
        """Source index of each of this process's rows of global batch `step`."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        return mixture_choices(self.seed, np.arange(start, start + self.local_batch_size),
                               self.weights)

    def __next__(self) -> dict:
        step = self._position // self.global_batch_size
        which = self.choices(step)
        rows = [self.sources[k].next_example() for k in which]
        self._position += self.global_batch_size
        ids = [ex["sample_id"] for ex in rows]
        self.last_sample_ids, self.last_sources = ids, [int(k) for k in which]
        return collate(rows, self.mode, batch_size=self.local_batch_size,
                       max_length=self.max_length, max_images=self.max_images,
                       image_shape=self.image_shape, pad_id=self.pad_id,
                       sample_ids=ids if self.return_sample_ids else None,
                       sample_inputs=self.sample_inputs, image_inputs=self.image_inputs)

    def get_state(self) -> dict:
        return {"position": self._position, "seed": self.seed, "weights": self.weights,
                "global_batch_size": self.global_batch_size,
                "sources": [s.get_state() for s in self.sources]}

    def set_state(self, state: dict):
        mine = {"seed": self.seed, "weights": self.weights,
                "global_batch_size": self.global_batch_size}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"mixture state was saved with {key}={state[key]}, this "
                                 f"mixture has {value}")
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"mixture state has {len(state['sources'])} sources, this "
                             f"mixture {len(self.sources)}")
        for s, st in zip(self.sources, state["sources"]):
            s.set_state(st)
        self._position = int(state["position"])

    def report(self) -> list:
        """Each source's bad-record counts, in order."""
        return [s.report() for s in self.sources]

    def close(self):
        for s in self.sources:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
