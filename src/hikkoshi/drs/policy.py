"""The planner's knobs, as data: the threshold level, what counts as stable, what a move may cost.

The threshold level (vSphere DRS's migration threshold, 1 conservative to 5 aggressive) sets how much
imbalance the cluster may keep and how much goodness a move must buy per unit of cost. Imbalance is the
standard deviation of the hosts' normalised loads; a move's goodness is how much it lowers their sum of
squared deviations (the same in a cluster of 4 hosts or 1,000); its cost is its predicted migration in
units of ``cost_unit_s`` of migration time plus ``cost_unit_bytes`` on the wire plus
``cost_unit_downtime_ms`` of guest pause.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hikkoshi.migrate.predict import DEFAULT_CALIBRATION, Calibration, Link, Mode

GIB = 1 << 30
LAN = Link(bandwidth=1.25e9, rtt_ms=0.2)
"""A site's own network when the snapshot has no link for it: 10 Gbit/s, 0.2 ms."""


@dataclass(frozen=True)
class Level:
    """What one threshold level allows."""

    tolerance: float
    """Imbalance left alone; balancing moves only while it is above."""
    gain_per_cost: float
    """A balancing move's goodness must be at least this times its cost."""


LEVELS: dict[int, Level | None] = {
    1: None,  # mandatory moves only: maintenance and broken must rules
    2: Level(tolerance=0.15, gain_per_cost=0.05),
    3: Level(tolerance=0.08, gain_per_cost=0.01),
    4: Level(tolerance=0.04, gain_per_cost=0.003),
    5: Level(tolerance=0.02, gain_per_cost=0.001),
}
"""Scale: moving 2 % of a host's load between hosts 0.3 apart is a goodness of about 0.011; moving an
8 GiB VM over 10 Gbit/s costs about 0.27 (7 s, 8.6 GB, 30 ms). Level 3 takes it, level 2 does not."""


@dataclass(frozen=True)
class Policy:
    """How the planner decides."""

    level: int = 3
    stable_cv: float = 0.3
    """A load is stable over the window when its samples' standard deviation is at most this fraction
    of their mean; balancing moves rest only on stable loads."""
    stable_cpu_floor: float = 0.05
    """Cores: a CPU load whose samples stay within this of their mean is stable however small it is."""
    stable_memory_floor: float = float(16 << 20)
    """Bytes: the same for memory."""
    cpu_limit: float = 1.0
    """Of a host's cores, the share its VMs' CPU demand may reach on a host a move goes to."""
    memory_limit: float = 1.0
    """Of a host's VM memory, the share its VMs' configured memory may take (1: no overcommit)."""
    new_vm_cpu: float = 0.5
    """The busy share of a new VM's vCPUs, until it has samples of its own."""
    storage_mode: Mode = Mode.HYBRID
    """How disks follow a VM to a host that does not see their datastore."""
    lan: Link = LAN
    """The network within a site, when the snapshot has no link for it (10 Gbit/s)."""
    cross_site: bool = False
    """Whether balancing moves may cross sites (mandatory ones may when nothing closer fits)."""
    candidates: int = 8
    """Hosts considered at each end (most and least loaded) when looking for a balancing move."""
    cost_unit_s: float = 60.0
    cost_unit_bytes: float = 64 * GIB
    cost_unit_downtime_ms: float = 1000.0
    space_threshold: float = 0.8
    """Storage DRS: a datastore fuller than this sheds disks (and no move fills one past it)."""
    latency_threshold_ms: float = 15.0
    """Storage DRS: a datastore whose p90 latency (median over the window) is above sheds I/O."""
    storage_drs: bool = True
    calibration: Calibration = field(default=DEFAULT_CALIBRATION)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError("the threshold level is 1 to 5")
        if not (self.cpu_limit > 0 and self.memory_limit > 0 and 0 < self.space_threshold <= 1):
            raise ValueError("limits must be positive fractions")
        if self.candidates < 1 or self.stable_cv < 0:
            raise ValueError("bad candidates or stable_cv")

    @property
    def balance(self) -> Level | None:
        """The balancing settings of the level; ``None`` at level 1 (no balancing)."""
        return LEVELS[self.level]
