"""What every route of the dashboard shares: its source, its sessions, the link predictions assume,
and the predictions it made for the migrations it started (shown beside what happened)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hikkoshi.web.auth import Sessions
from hikkoshi.web.prediction import LinkAssumption
from hikkoshi.web.source import Source

#: How many predictions the dashboard remembers (one per migration it started; the oldest go first).
MAX_PREDICTIONS = 1000


@dataclass
class Dashboard:
    """The dashboard's state (one per process)."""

    source: Source
    sessions: Sessions
    link: LinkAssumption = field(default_factory=LinkAssumption)
    #: Seconds between two reads of the source for a page's live updates.
    overview_every: float = 1.0
    migration_every: float = 0.5
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def remember_prediction(self, migration_id: str, prediction: dict[str, Any]) -> None:
        """Keep what was predicted for a migration this dashboard started."""
        self.predictions[migration_id] = prediction
        while len(self.predictions) > MAX_PREDICTIONS:
            del self.predictions[next(iter(self.predictions))]
