"""A host as the cluster lists it, and its state. Pure."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hikkoshi.cluster.models import HostInfo, HostStatus, Maintenance


class HostState(enum.Enum):
    """How a host stands in the cluster."""

    UP = "up"
    DOWN = "down"
    """Its lease lapsed: it stopped renewing (dead, or cut off from etcd)."""
    MAINTENANCE = "maintenance"
    """Up, but nothing is to be placed on it (see :attr:`HostView.maintenance`)."""


@dataclass(frozen=True)
class HostView:
    """A host as listed: what it is, how it is doing (None when down) and its state."""

    info: HostInfo
    status: HostStatus | None
    maintenance: Maintenance | None
    state: HostState
