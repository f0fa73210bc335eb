"""Peak memory per training phase: resident set size on CPU, allocated bytes on CUDA.

On CPU a background thread samples /proc/self/statm every few milliseconds (ru_maxrss only ever
grows, so it cannot say which phase set the peak). Sampling costs a wake-up per interval.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

SAMPLER_THREAD = "sd-peak-memory"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """`with PeakMemory(device) as memory:`; PhaseTimer(memory) fills `memory.peaks_mb` -> {"rollout": MB, ...}.

    A context manager so the sampling thread stops however the block ends: a thread left behind
    by a failed run would open /proc/self/statm every few ms for the rest of the process.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peaks_mb: dict[str, float] = {}
        self._current = 0
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda":
            self._thread = threading.Thread(target=self._sample, name=SAMPLER_THREAD, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._current = max(self._current, current_rss_bytes())

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._current = current_rss_bytes()

    def stop(self, name: str) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = max(self._current, current_rss_bytes())
            trim_heap()
        self.peaks_mb[name] = max(self.peaks_mb.get(name, 0.0), peak / 2**20)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> PeakMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.mallopt, _LIBC.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up by
    hundreds of MB over the first steps from fragmentation alone). Costs about a millisecond."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


@contextmanager
def heap_trimmed_between_layers(decoder: torch.nn.Module, every: int = 5):
    """Inside the block, give freed heap memory back to the OS after the forward of every
    `every`-th decoder layer (CPU, glibc; elsewhere it does nothing).

    Tensors under the mmap threshold (1 MB, `return_freed_memory_to_os`) come from the heap, and a
    layer's transient ones, freed while the saved activations above them stay, leave holes that
    the heap keeps: on the reference step the student's forward ended ~200 MB above what was live.
    A trim costs 2-5 ms. Measured (benchmarks/step_speed.py, 2026-11-30, AMD EPYC, 2 threads): the
    student phase's peak RSS 1660 MB against ~1860 MB without, every 2 or every 5 layers alike.
    """
    layers = getattr(decoder, "layers", None)
    on_cpu = next(decoder.parameters()).device.type == "cpu"
    if layers is None or not on_cpu or not _libc():
        yield
        return
    handles = [layer.register_forward_hook(lambda *_: trim_heap()) for i, layer in enumerate(layers) if i % every == every - 1]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def return_freed_memory_to_os() -> bool:
    """Make glibc hand large freed blocks straight back to the OS.

    glibc raises its mmap threshold after large blocks are freed, so later large tensors come from
    the heap and their memory stays in the process after they are freed. Training allocates and frees
    big transient tensors every step (folded sampling weights, logit chunks); with a fixed threshold
    each of them is its own mapping and peak RSS tracks what is really live. Returns False where
    this is not glibc.
    """
    libc = _libc()
    if not libc:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 20))
