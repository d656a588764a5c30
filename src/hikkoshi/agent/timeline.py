"""A plot of one migration's timeline, saved as PNG beside its report: bytes moved (memory, disks),
the guest's dirty rate, the destination cache's fill, and the guest's disk I/O latency, with the
phases marked."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hikkoshi.migrate.record import MigrationRecord

_MIB = 1 << 20
_PAGE = 4096


def _series(
    samples: list[tuple[float, dict[str, Any]]], key: str, scale: float = 1.0
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for t, data in samples:
        value = data.get(key)
        if isinstance(value, int | float):
            xs.append(t)
            ys.append(value * scale)
    return xs, ys


def timeline_series(
    samples: list[tuple[float, dict[str, Any]]],
) -> dict[str, tuple[list[float], list[float]]]:
    """The curves of the plot, by name, from a job's progress samples."""
    cache_x, cache_y = [], []
    for t, data in samples:
        done, total = data.get("disk_done"), data.get("disk_total")
        if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
            cache_x.append(t)
            cache_y.append(100.0 * done / total)
    return {
        "memory_mib": _series(samples, "memory_done", 1 / _MIB),
        "disk_mib": _series(samples, "disk_done", 1 / _MIB),
        "dirty_mib_s": _series(samples, "dirty_pages_rate", _PAGE / _MIB),
        "cache_percent": (cache_x, cache_y),
        "io_latency_ms": _series(samples, "io_latency_ms"),
    }


#: The one thread that draws. matplotlib caches its open font files per thread (the cache's key holds
#: the thread's id), so drawing in whichever thread of a pool happens to be free opens the fonts again
#: in each: an agent's open files and memory grew with every migration until its pool had drawn in
#: every thread (found by the endurance run). One thread keeps one set.
_PLOTTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="timeline")


async def draw_timeline(
    samples: list[tuple[float, dict[str, Any]]], record: MigrationRecord, path: Path
) -> None:
    """:func:`render_timeline` in the plotting thread, awaited."""
    await asyncio.get_running_loop().run_in_executor(_PLOTTER, render_timeline, samples, record, path)


def render_timeline(samples: list[tuple[float, dict[str, Any]]], record: MigrationRecord, path: Path) -> None:
    """Draw the timeline of ``record`` from its ``samples`` (seconds since the start, progress) into
    ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    curves = timeline_series(samples)
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(9, 9))
    panels = [
        (axes[0], [("memory_mib", "memory sent"), ("disk_mib", "disk copied")], "MiB"),
        (axes[1], [("dirty_mib_s", "dirty rate")], "MiB/s"),
        (axes[2], [("cache_percent", "destination disk complete")], "%"),
        (axes[3], [("io_latency_ms", "guest disk I/O latency")], "ms"),
    ]
    for ax, keys, unit in panels:
        for key, label in keys:
            xs, ys = curves[key]
            if xs:
                ax.plot(xs, ys, label=label, drawstyle="steps-post")
        ax.set_ylabel(unit)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    if record.phases:
        start = record.phases[0].started
        for p in record.phases:
            x = p.started - start
            for ax in axes:
                ax.axvline(x, color="grey", alpha=0.3, linewidth=0.8)
            axes[0].annotate(p.phase.value, (x, 1.0), xycoords=("data", "axes fraction"), rotation=60,
                             fontsize=6, va="bottom")  # fmt: skip
    axes[-1].set_xlabel("seconds since the migration started")
    down = record.report.get("downtime_ms")
    fig.suptitle(
        f"migration {record.id}: VM {record.vm}, {record.kind} {record.storage.value}, {record.phase.value}"
        + (f", downtime {down} ms" if down is not None else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
