"""The figures of a long job as people read them: bytes done of a total, a rate, a time left.

Every figure has a bounded width (numbers stay below 1024 of their unit), so a progress line can be
laid out to fit a terminal without cutting any of them. :class:`Meter` turns successive byte counts
into a rate over the last few seconds.
"""

from __future__ import annotations

from collections import deque

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _unit(value: float) -> tuple[float, str]:
    """The divisor and name of the binary unit that shows ``value`` as less than 1024."""
    scale = 1.0
    for name in _UNITS:
        if abs(value) < 1024 * scale or name == _UNITS[-1]:
            return scale, name
        scale *= 1024
    raise AssertionError("unreachable")


def size(value: int) -> str:
    """``67.1 MiB`` (at most 10 characters)."""
    scale, name = _unit(value)
    return f"{value} B" if name == "B" else f"{value / scale:.1f} {name}"


def size_pair(done: int, total: int | None) -> str:
    """``67.1/256.0 MiB``: both in the unit of the total (at most 17 characters); ``done`` alone
    without a total."""
    if total is None:
        return size(done)
    scale, name = _unit(max(total, done))
    if name == "B":
        return f"{done}/{total} B"
    return f"{done / scale:.1f}/{total / scale:.1f} {name}"


def rate(bytes_per_s: float | None) -> str:
    """``45.2 MiB/s`` (at most 12 characters); ``-`` when unknown."""
    if bytes_per_s is None:
        return "- B/s"
    return f"{size(max(int(bytes_per_s), 0))}/s"


def duration(seconds: float | None) -> str:
    """``0:01:23`` (hours grow past 9 as needed); ``-:--:--`` when unknown."""
    if seconds is None or seconds < 0 or seconds != seconds:  # NaN is unknown too
        return "-:--:--"
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def eta(done: int, total: int | None, bytes_per_s: float | None) -> float | None:
    """Seconds until ``total`` at this rate; ``None`` when that cannot be said."""
    if total is None or not bytes_per_s or bytes_per_s <= 0:
        return None
    return max(total - done, 0) / bytes_per_s


class Meter:
    """The rate of a growing byte count over the last ``window`` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def reset(self) -> None:
        """Forget the samples (a new phase counts from zero again)."""
        self._samples.clear()

    def add(self, now: float, done: int) -> None:
        """Record that ``done`` bytes were done at time ``now`` (seconds)."""
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # the count went back: another pass or phase
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Bytes per second over the window; ``None`` before two samples a moment apart."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.2:
            return None
        return (d1 - d0) / (t1 - t0)
