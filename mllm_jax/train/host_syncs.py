"""Counting a training run's host syncs: `HostSyncs` (for tests and benchmarks) and the
loop's own reads of device values (`host_read`, `host_fetch`), which it counts."""
import contextlib
import time
from typing import Callable

import jax


class HostSyncs:
    """Counts a training run's host syncs for real, for tests and benchmarks:

        with loop.HostSyncs() as syncs:
            loop.train(cfg, workdir)
        syncs.steps  # the boundary of every read, e.g. [10, 20, 30] for log_every=10
        syncs.stray  # reads made while steps ran, outside the loop's reads: none

    While it is active, every read of a `jax.Array`'s value on the host is seen (`float`,
    `np.asarray`, `jax.device_get`, ... all go through `jax.Array._value`; a transfer guard
    would not do: it ignores CPU arrays, which need no transfer). The loop's own reads
    (`host_read`: a boundary's fetch, and with several processes the agreement on stop
    signals) count one sync each, in `steps` with the step and in `times` with
    `time.perf_counter()` after the read (the devices had finished every step up to it). A
    read anywhere else while the steps run is recorded in `stray` as (step, what was read).
    Checkpoint saves are neither: they read the state on their own cadence."""

    active = None

    def __enter__(self):
        from jax._src import array
        self._original = array.ArrayImpl.__dict__.get("_value")
        if not isinstance(self._original, property):
            raise RuntimeError("HostSyncs counts reads through jax.Array._value, which this "
                               f"jax ({jax.__version__}) does not have")
        self.steps, self.times, self.stray = [], [], []
        self.kind, self.step = None, 0
        counter, original = self, self._original

        def value(array_):
            if counter.kind == "steps":
                counter.stray.append((counter.step, f"{array_.dtype}{list(array_.shape)}"))
            return original.fget(array_)

        array.ArrayImpl._value = property(value)
        HostSyncs.active = self
        return self

    def __exit__(self, *exc):
        from jax._src import array
        array.ArrayImpl._value = self._original
        HostSyncs.active = None

    @staticmethod
    @contextlib.contextmanager
    def region(kind: str, step: int | None = None):
        """While active: the loop is in `kind` ("steps": dispatching; "read": one of its
        own reads; "save": a checkpoint save) at `step`."""
        counter = HostSyncs.active
        if counter is None:
            yield
            return
        outer = counter.kind
        counter.kind, counter.step = kind, counter.step if step is None else step
        try:
            yield
        finally:
            counter.kind = outer


def host_read(read: Callable, step: int):
    """`read()`, a read of device values at step `step`, counted by an active HostSyncs."""
    with HostSyncs.region("read", step):
        out = read()
    if HostSyncs.active is not None:
        HostSyncs.active.steps.append(step)
        HostSyncs.active.times.append(time.perf_counter())
    return out


def host_fetch(tree, step: int):
    """The loop's one read of device values at boundary `step`: one `jax.device_get` of
    everything the boundary needs (the metrics of the steps since the last one, the
    counters, the learning rate). Between boundaries the loop only dispatches steps, so the
    host runs up to `log_every` steps ahead of the devices instead of waiting for each."""
    return host_read(lambda: jax.device_get(tree), step)
