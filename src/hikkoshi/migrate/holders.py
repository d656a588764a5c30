"""Releasing a host that held a VM's disks (shared storage) once the VM no longer needs them there.

The holder's supervisor serves the disks since the VM left; released, it exits and the VM's home there
(spec, disks, logs) is deleted. Only a home whose supervisor serves (or served, when it died: its last
word says so) is ever deleted here: a home that runs its VM is never touched. An agent releases its
holders through the holder's agent instead (:mod:`hikkoshi.agent`).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from hikkoshi.daemons import supervisor_client
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.vm.disk_serving import Holder
from hikkoshi.vm.home import VmHome

#: The supervisor states of a home that holds disks for a VM running elsewhere.
HOLDING = ("serving",)


async def release_holder_by_path(holder: Holder, migration: str) -> None:
    """Release a holder this process reaches by path (see the module's docstring)."""
    if holder.home is None:
        raise SideError(f"the disks' holder {holder.host} is reached through its agent, not by path")
    home = VmHome(Path(holder.home))
    if not home.path.exists():
        return  # released before (a job taken over repeats this step)
    state = home.read_state().get("state")
    if state not in HOLDING:
        raise SideError(f"{home.path} is {state}, not holding disks for another host: not released")
    if home.is_running():
        side = VmSide(home, home.load_spec(), f"holder {holder.host}")
        await side.ctl("release")
        if not await asyncio.to_thread(supervisor_client.wait_stopped, home, 60):
            raise SideError(f"the holder's supervisor in {home.path} did not exit after release")
    await asyncio.to_thread(shutil.rmtree, home.path)
