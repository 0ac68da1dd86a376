"""The demo's progress display: one line per phase with its wall time, and a step counter
(tqdm on stderr) while a phase runs."""
from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    """Phases in order; `times` maps each finished phase to its wall time in seconds,
    `cpu_times` to the CPU time of this process (all threads) meanwhile."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.times = {}
        self.cpu_times = {}
        self._bar = None
        self.count = 0  # steps counted in the running phase

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self, text: str):
        if self.enabled:
            print(f"[{self.elapsed():6.1f}s] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "step"):
        """Times the block as phase `name`; `self.update(n)` advances its counter."""
        self.line(f"{name} ...")
        t0, c0 = time.perf_counter(), time.process_time()
        self.count = 0
        if self.enabled and total:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=name, unit=unit, file=self.stream, leave=False,
                             dynamic_ncols=True, mininterval=0.5)
        try:
            yield self
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        self.times[name] = time.perf_counter() - t0
        self.cpu_times[name] = time.process_time() - c0
        self.line(f"{name} done in {self.times[name]:.1f}s (cpu {self.cpu_times[name]:.1f}s)")

    def update(self, n: int = 1, **postfix):
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
