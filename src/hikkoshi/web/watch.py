"""One migration followed for one page: its samples as they come, its progress through a ratchet, and
its status as the page shows it (the text, the bar, the phases, rounds, figures and report as HTML
fragments rendered by the same templates as the first page, so the page never reloads)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hikkoshi.migrate.phases import Phase, committed
from hikkoshi.web.progress import Eta, Ratchet, moving, percent
from hikkoshi.web.render import render
from hikkoshi.web.source import Source
from hikkoshi.web.timeline import (
    chart_row,
    disk_split,
    downtime,
    memory_rounds,
    phase_spans,
    predicted_vs_actual,
)
from hikkoshi.web.views import MigrationView


def cancellable(m: MigrationView) -> bool:
    """Whether a person may still cancel it: it runs and has not reached its commit point."""
    try:
        phase = Phase(m.phase)
    except ValueError:
        return False
    return (
        m.running
        and phase != Phase.ROLLBACK
        and not committed(phase)
        and not m.record.get("facts", {}).get("committed", False)
    )


@dataclass
class Watch:
    """See the module."""

    source: Source
    migration_id: str
    predicted: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    ratchet: Ratchet = field(default_factory=Ratchet)
    eta: Eta = field(default_factory=Eta)
    migration: MigrationView | None = None

    async def poll(self) -> tuple[int, list[list[float | None]]]:
        """Read the migration and its new samples; the index of the first new one, and the new ones as
        chart rows."""
        self.migration = await self.source.migration(self.migration_id)
        start = len(self.samples)
        new, _total = await self.source.samples(self.migration_id, start)
        self.samples += new
        return start, [chart_row(s) for s in new]

    @property
    def finished(self) -> bool:
        """Ended, and its agent is done with it (its samples and report are final)."""
        m = self.migration
        return m is not None and not m.in_flight and not m.running

    def status(self, now: float | None = None) -> dict[str, Any]:
        """What the page shows now (see the module); call after :meth:`poll`."""
        m = self.migration
        assert m is not None
        now = time.time() if now is None else now
        shown = self.ratchet("percent", percent(m.phase, m.progress))
        eta = None
        what = moving(m.progress)
        if what is not None and m.running:
            eta = self.eta.update(what[0], now, what[1], what[2])
        spans = phase_spans(m.record, now if m.in_flight else (m.finished or now))
        predicted = m.report.get("predicted") or self.predicted
        context = {
            "m": m,
            "spans": spans,
            "total": max((s["end"] for s in spans), default=0.0) or 1.0,
            "rounds": memory_rounds(self.samples),
            "split": disk_split(self.samples, m.report),
            "down": downtime(m.record, m.report),
            "compare": predicted_vs_actual(predicted, m.report),
            "predicted": predicted,
            "cancellable": cancellable(m),
            "percent": shown,
            "eta": eta,
        }
        return {
            "state": m.state,
            "phase": m.phase,
            "percent": shown,
            "eta": eta,
            "final": not m.in_flight,
            "timeline": {"phases": spans, "downtime": context["down"]},
            "html": {
                "phases": render("_phases.html", **context),
                "figures": render("_figures.html", **context),
                "actions": render("_actions.html", **context),
                "report": render("_report.html", **context),
            },
        }
