"""The errors of the VM layer: each carries a message meant for the person at the keyboard."""

from __future__ import annotations

from collections.abc import Sequence


class VmError(Exception):
    """Something about a VM, its spec, datastore or processes went wrong; ``str()`` says what."""


class SpecError(VmError):
    """A VM spec is invalid. ``problems`` holds one readable line per problem."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"invalid VM spec{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class PrecheckError(VmError):
    """The host cannot run or hold this VM (memory, files, addresses, space); one line per problem."""

    def __init__(self, problems: Sequence[str], what: str) -> None:
        self.problems = list(problems)
        super().__init__(f"cannot {what}:\n" + "\n".join(f"  {p}" for p in self.problems))


class DatastoreError(VmError):
    """A datastore is missing, not a datastore, or cannot do what was asked."""


class RuntimeStateError(VmError):
    """The VM is not in a state that allows the request (already running, not running, ...)."""


class VmStartError(VmError):
    """QEMU or the NBD service of a VM did not come up."""
