"""Which accelerator runs VMs here: KVM where it really runs guests, else TCG.

``$HIKKOSHI_ACCEL`` (``kvm`` or ``tcg``) overrides everything. Otherwise there is no KVM without a
usable ``/dev/kvm``, and with one :mod:`hikkoshi.vm.kvm_probe` boots a tiny guest under KVM to find
out. The probe's answer holds until the host reboots or the QEMU binary changes, so it is remembered
per host boot and QEMU binary: in this process, and in ``accel.json`` in the user's cache directory
(``$XDG_CACHE_HOME/hikkoshi``, else ``~/.cache/hikkoshi``), for the processes that come after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

DEFAULT_QEMU = "qemu-system-x86_64"
Accel = Literal["kvm", "tcg"]

MEMO_FILE = "accel.json"
_memo: dict[str, Accel] = {}


def choose_accel(
    requested: str = "auto", *, qemu: str = DEFAULT_QEMU, env: Mapping[str, str] | None = None
) -> Accel:
    """The accelerator to run a VM with: ``requested`` unless it is ``auto`` (then :func:`detect_accel`)."""
    if requested in ("kvm", "tcg"):
        return "kvm" if requested == "kvm" else "tcg"
    if requested != "auto":
        raise ValueError(f"accelerator must be auto, kvm or tcg, not {requested!r}")
    return detect_accel(qemu=qemu, env=env)


def detect_accel(*, qemu: str = DEFAULT_QEMU, env: Mapping[str, str] | None = None) -> Accel:
    """``"kvm"`` if KVM really runs guests here, else ``"tcg"``; ``$HIKKOSHI_ACCEL`` overrides."""
    env = os.environ if env is None else env
    forced = env.get("HIKKOSHI_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ValueError(f"HIKKOSHI_ACCEL must be kvm or tcg, not {forced!r}")
        return "kvm" if forced == "kvm" else "tcg"
    if not kvm_device_usable():
        return "tcg"
    key = _memo_key(qemu)
    if key in _memo:
        return _memo[key]
    path = memo_path(env)
    saved = _read_memo(path)
    answer = saved.get(key)
    if answer not in ("kvm", "tcg"):
        # Loaded only to probe: what merely names an accelerator (command lines) stays process-free.
        from hikkoshi.vm import kvm_probe

        answer = "kvm" if kvm_probe.guest_runs(qemu) else "tcg"
        # Only this boot's answers are worth keeping.
        kept = {k: v for k, v in saved.items() if k.startswith(boot_id() + " ")}
        _write_memo(path, {**kept, key: answer})
    result: Accel = "kvm" if answer == "kvm" else "tcg"
    _memo[key] = result
    return result


def kvm_device_usable() -> bool:
    """Whether ``/dev/kvm`` can be opened for reading and writing (KVM may still not run guests)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def memo_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the probe's answers are remembered between processes."""
    env = os.environ if env is None else env
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "hikkoshi" / MEMO_FILE


def boot_id() -> str:
    """This host boot's id (``unknown`` where the kernel does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _memo_key(qemu: str) -> str:
    qemu_path = shutil.which(qemu) or qemu
    try:
        qemu_stamp = str(os.stat(qemu_path).st_mtime_ns)  # an upgraded QEMU may answer otherwise
    except OSError:
        qemu_stamp = "missing"
    return f"{boot_id()} {qemu_path} {qemu_stamp}"


def _read_memo(path: Path) -> dict[str, str]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}


def _write_memo(path: Path, memo: Mapping[str, str]) -> None:
    # Best effort: without a writable cache the next process probes again, which is only slower.
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=2) + "\n")
        os.replace(tmp, path)
