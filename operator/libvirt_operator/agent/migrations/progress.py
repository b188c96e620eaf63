"""Pure parts of a running migration: status.progress from libvirt's job figures, and the watchdog that
turns the completion and progress timeouts into a decision."""

from __future__ import annotations

from dataclasses import dataclass, field

from libvirt_operator.hypervisor.migration import JobStats

GIB = 1 << 30


def progress_fields(stats: JobStats, *, postcopy: bool = False, when: str | None = None) -> dict:
    """status.progress (camelCase, only what libvirt reported)."""
    out = {
        "percent": stats.percent,
        "dataTotalBytes": stats.data_total,
        "dataProcessedBytes": stats.data_processed,
        "dataRemainingBytes": stats.data_remaining,
        "memoryDirtyRateBytesPerSecond": stats.dirty_rate_bytes,
        "memoryBytesPerSecond": stats.memory_bps,
        "iteration": stats.iteration,
        "autoConvergeThrottle": stats.auto_converge_throttle,
        "downtimeMilliseconds": stats.downtime,
        "elapsedMilliseconds": stats.elapsed,
        "postcopy": postcopy or None,
        "updateTime": when,
    }
    return {k: v for k, v in out.items() if v is not None}


def completion_timeout(per_gib: int, memory_bytes: int, disk_bytes: int = 0) -> float:
    """KubeVirt's rule, seconds per GiB of memory and copied disk, counting at least 1 GiB (a small
    guest under TCG on a loaded node still gets the per-GiB figure)."""
    return per_gib * max(1.0, (memory_bytes + disk_bytes) / GIB)


@dataclass
class Watchdog:
    """Feed it the remaining bytes as the job reports them; it says when to give up (or switch to
    post-copy): "Timeout" after `completion_s`, "NoProgress" when the remaining bytes have not reached
    a new low for `progress_s`. Times are the caller's monotonic seconds."""

    started: float
    completion_s: float
    progress_s: float
    _lowest: int | None = None
    _lowest_at: float | None = field(default=None)

    def observe(self, now: float, remaining: int | None) -> str | None:
        if self._lowest_at is None:
            self._lowest_at = now
        if remaining is not None and (self._lowest is None or remaining < self._lowest):
            self._lowest, self._lowest_at = remaining, now
        if now - self.started >= self.completion_s:
            return "Timeout"
        if now - self._lowest_at >= self.progress_s:
            return "NoProgress"
        return None
