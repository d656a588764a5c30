"""What a host lets a VM use, whoever asks (a person through the agent's API, or a peer whose migration
brings a spec here): files only from directories the host allows (its datastores and ``--allow-dir``
ones), boot files of a home only inside that home, and port forwards on a loopback address unless the
host allows wildcard ones. A path is judged by where it really leads (symbolic links resolved).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hikkoshi.vm.spec import VmSpec


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


@dataclass(frozen=True)
class HostPolicy:
    """See the module's docstring."""

    allowed_dirs: tuple[Path, ...] = ()
    wildcard_forwards: bool = False
    """Whether a guest's port may be forwarded from every address of the host (``0.0.0.0``)."""

    def file_problem(self, path: Path, what: str) -> str | None:
        """Why ``path`` may not be used as ``what`` here (``None``: it may)."""
        if not path.is_absolute():
            return f"{what} {path}: give an absolute path"
        real = _real(path)
        if any(real.is_relative_to(_real(d)) for d in self.allowed_dirs):
            return None
        where = ", ".join(str(d) for d in self.allowed_dirs) or "none"
        return (
            f"{what} {path} is outside the directories this host allows ({where}); an agent started with "
            "--allow-dir DIR allows more"
        )

    def spec_problems(self, spec: VmSpec, home: Path) -> list[str]:
        """Everything in ``spec`` (of the VM whose home is ``home``) this host does not allow."""
        problems = []
        for what, path in (("kernel", spec.boot.kernel), ("initrd", spec.boot.initrd)):
            if path is None:
                continue
            if path.is_absolute():
                problem = self.file_problem(path, what)
                if problem:
                    problems.append(problem)
            elif not _real(home / path).is_relative_to(_real(home)):
                problems.append(f"{what} {path} leads out of the VM's home")
        for i, nic in enumerate(spec.nics):
            for forward in nic.forwards:
                if forward.host_address.is_unspecified and not self.wildcard_forwards:
                    problems.append(
                        f"nics[{i}]: a port forward from every address of the host ({forward.host_address}:"
                        f"{forward.host_port}) is not allowed here; forward from 127.0.0.1, or start the "
                        "agent with --allow-wildcard-forwards"
                    )
        return problems
