"""What a server serves: named exports over block devices, and what negotiation says about them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hikkoshi.nbd.constants import HIKKOSHI_HEAT, MAX_PAYLOAD, TransmissionFlag
from hikkoshi.nbd.device import BlockDevice, Capabilities
from hikkoshi.nbd.export_info import ExportInfo
from hikkoshi.nbd.stats import ExportStats


def export_flags(caps: Capabilities) -> int:
    """Transmission flags advertising exactly what a device can do."""
    f = TransmissionFlag
    flags = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_DF
    if caps.read_only:
        flags |= f.READ_ONLY
    else:
        flags |= f.SEND_FUA if caps.fua else 0
        flags |= f.SEND_TRIM if caps.trim else 0
        flags |= f.SEND_WRITE_ZEROES if caps.write_zeroes else 0
        flags |= f.SEND_FAST_ZERO if caps.write_zeroes and caps.fast_zero else 0
    flags |= f.SEND_CACHE if caps.cache else 0
    flags |= f.CAN_MULTI_CONN if caps.multi_conn else 0
    flags |= f.ROTATIONAL if caps.rotational else 0
    return int(flags)


@dataclass(eq=False)
class Export:
    """One named export: a device, its statistics, and its connections."""

    name: str
    device: BlockDevice
    description: str = ""
    stats: ExportStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = ExportStats(self.device.size)

    def info(self) -> ExportInfo:
        return ExportInfo(
            name=self.name,
            size=self.device.size,
            flags=export_flags(self.device.capabilities),
            description=self.description,
            max_block=MAX_PAYLOAD,
            meta_contexts=(*self.device.meta_contexts, HIKKOSHI_HEAT),
        )


class ExportTable:
    """The exports of one server; the first added is also the default (empty name)."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"duplicate export name {export.name!r}")
        self._exports[export.name] = export

    def get(self, name: str) -> Export | None:
        if name == "" and "" not in self._exports and self._exports:
            return next(iter(self._exports.values()))
        return self._exports.get(name)

    def lookup(self, name: str) -> ExportInfo | None:
        export = self.get(name)
        return None if export is None else export.info()

    def exports(self) -> Iterable[ExportInfo]:
        return [e.info() for e in self._exports.values()]

    def __iter__(self) -> Iterator[Export]:
        return iter(self._exports.values())
