"""Loads from samples: their level over the window, whether they were stable, a host's normalised load."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean(samples: Sequence[float]) -> float:
    """The level of a load over the window (0 without samples)."""
    return sum(samples) / len(samples) if samples else 0.0


def stable(samples: Sequence[float], max_cv: float, floor: float = 0.0) -> bool:
    """Whether the samples stayed within ``max_cv`` (coefficient of variation) of their mean, or within
    ``floor`` of it (a load too small to matter is not unstable for being noisy: an idle guest's few
    percent of a core). Fewer than two samples, or a mean of 0, tell nothing against it."""
    if len(samples) < 2:
        return True
    m = mean(samples)
    if m <= 0:
        return True
    # Plain floats: statistics.pstdev is exact (fractions) and 100x slower, for no gain here.
    var = sum((x - m) * (x - m) for x in samples) / len(samples)
    bound = max(max_cv * m, floor)
    return var <= bound * bound


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else 0.0


def normalised(cpu: float, cores: float, memory: float, capacity: float) -> float:
    """A host is as loaded as its busiest resource: CPU demand over cores, active memory over memory."""
    c = cpu / cores if cores > 0 else math.inf
    m = memory / capacity if capacity > 0 else math.inf
    return c if c > m else m
