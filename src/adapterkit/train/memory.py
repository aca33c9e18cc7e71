"""Memory accounting for training runs: process RSS, CUDA peaks and optimizer-state arithmetic."""

from __future__ import annotations

import sys
import threading
from types import TracebackType

import psutil
import torch

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]  # an optional stdlib module: None marks it absent

# Optimizer states kept per parameter (AdamW: exp_avg and exp_avg_sq).
_STATES_PER_PARAM = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, "momentum": 1}


def current_rss_bytes() -> int:
    """Resident set size of this process right now."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Highest RSS this process has reached since it started (kernel high-water mark)."""
    peak = 0
    if resource is not None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        peak = int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024
    return max(peak, current_rss_bytes())


class PeakMemory:
    """Context manager measuring peak memory while its block runs.

    ``ru_maxrss`` is a whole-process high-water mark that never resets, so a block that uses less than
    an earlier phase would be invisible; a background thread sampling RSS every ``interval_s`` gives
    the peak of this block alone (it can miss spikes shorter than the interval). On CUDA the
    allocator's own peak counter is reset on entry and read on exit.

    Attributes after exit: ``start_rss``, ``peak_rss``, ``end_rss`` (bytes), ``peak_rss_delta``,
    ``cuda_peak`` (bytes, or None without CUDA).
    """

    def __init__(self, interval_s: float = 0.02, device: torch.device | str | None = None) -> None:
        self.interval_s = interval_s
        self.device = device
        self.start_rss = self.peak_rss = self.end_rss = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def _cuda(self) -> bool:
        if not torch.cuda.is_available():
            return False
        return self.device is None or torch.device(self.device).type == "cuda"

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = self._proc.memory_info().rss
            if rss > self.peak_rss:
                self.peak_rss = rss

    def __enter__(self) -> PeakMemory:
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_rss = self.peak_rss = self._proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="adapterkit-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_rss = self._proc.memory_info().rss
        self.peak_rss = max(self.peak_rss, self.end_rss)
        if self._cuda():
            self.cuda_peak = int(torch.cuda.max_memory_allocated(self.device))

    @property
    def peak_rss_delta(self) -> int:
        """How far RSS rose above its level at entry."""
        return max(0, self.peak_rss - self.start_rss)

    def as_dict(self) -> dict[str, int | None]:
        return {
            "start_rss_bytes": self.start_rss,
            "peak_rss_bytes": self.peak_rss,
            "end_rss_bytes": self.end_rss,
            "peak_rss_delta_bytes": self.peak_rss_delta,
            "cuda_peak_bytes": self.cuda_peak,
        }


def optimizer_state_bytes(num_params: int, optimizer: str = "adamw", dtype_bytes: int = 4) -> int:
    """Bytes of optimizer state for ``num_params`` trainable parameters.

    AdamW keeps two fp32 tensors (first and second moment) per parameter: 8 bytes/param by default.
    """
    key = optimizer.lower()
    if key not in _STATES_PER_PARAM:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(_STATES_PER_PARAM)}")
    if num_params < 0 or dtype_bytes <= 0:
        raise ValueError("num_params must be >= 0 and dtype_bytes > 0")
    return int(num_params) * _STATES_PER_PARAM[key] * int(dtype_bytes)


def human_bytes(n: float) -> str:
    """Binary-prefixed size: 512 B, 1.5 KiB, 3.2 GiB."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{sign}{int(value)} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    return f"{sign}{value:.1f} PiB"
