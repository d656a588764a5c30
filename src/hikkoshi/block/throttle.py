"""A token bucket: limits the background copy's bandwidth so it does not starve the guest."""

from __future__ import annotations

import asyncio
import time


class Throttle:
    """``await take(n)`` returns once ``n`` more bytes fit under ``rate`` bytes/s (None: unlimited)."""

    def __init__(self, rate: float | None = None, burst_seconds: float = 0.1) -> None:
        self.burst_seconds = burst_seconds
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self.rate = rate

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError("bandwidth must be positive")
        self._rate = value
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        if self._rate is not None:
            cap = self._rate * self.burst_seconds
            self._tokens = min(cap, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def take(self, n: int) -> None:
        if self._rate is None:
            return
        self._refill()
        self._tokens -= n
        if self._tokens < 0:
            # Go into debt and sleep it off: large chunks still pass, at the right average rate.
            await asyncio.sleep(-self._tokens / self._rate)


def parse_rate(text: str) -> float:
    """Parse a bandwidth like ``100M``, ``12.5MiB``, ``1G`` (bytes per second) or ``100Mbit``."""
    s = text.strip()
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}
    bits = s.lower().endswith("bit")
    if bits:
        s = s[:-3]
    s = s.removesuffix("B").removesuffix("b") if not bits else s
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    number, unit = s[:i], s[i:].lower()
    if unit not in units or not number:
        raise ValueError(f"bad rate {text!r}: use e.g. 50M, 200MiB, 100Mbit")
    value = float(number) * units[unit]
    return value / 8 if bits else value
