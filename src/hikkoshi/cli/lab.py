"""`hikkoshi lab`: a multi-host lab on one machine (root): each host a network namespace with its own
address and its own agent, hosts in sites, sites joined by the WAN emulator; one etcd member for the
lab's cluster on the bridge's gateway address (the agents join it).

    hikkoshi lab up /srv/lab --hosts a,b,c --sites east,east,west --wan 150ms,100Mbit
    export HIKKOSHI_TOKEN_FILE=/srv/lab/token HIKKOSHI_CA_FILE=/srv/lab/pki/ca/ca-cert.pem
    export HIKKOSHI_ETCD=http://10.203.0.254:2379
    hikkoshi vm create web --host a --memory 256 --disk 1G --guest busy
    hikkoshi migrate web --to c                                   # across the WAN
    hikkoshi lab down /srv/lab

The lab makes its own cluster CA (``DIR/pki/ca``) and a certificate for each host (for its address):
its agents know each other by them, and every migration stream between them is encrypted, as between
real hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hikkoshi.cluster.errors import EtcdNotInstalled, EtcdProcessError
from hikkoshi.cluster.etcd_process import EtcdMember, MemberSpec
from hikkoshi.daemons import supervisor_client as control
from hikkoshi.lab.netns_lab import LabError, LabPlan, plan_lab, setup_commands, teardown_commands
from hikkoshi.lab.netns_run import run_ip
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import write_atomically
from hikkoshi.vm.procs import alive

AGENT_PORT = 8710
ETCD_PORTS = (2379, 2380)
LAB_FILE = "lab.json"


def add_parser(top: Any) -> None:
    group = top.add_parser(
        "lab", help="a multi-host lab on this machine (network namespaces)"
    ).add_subparsers(dest="lab_command", required=True)
    p = group.add_parser("up", help="make the lab and start an agent per host")
    p.add_argument("dir", type=Path, help="the lab's directory (datastores, token, logs)")
    p.add_argument("--hosts", default="a,b", help="host names, comma-separated (default a,b)")
    p.add_argument(
        "--sites", help="each host's site, comma-separated (default: one site; with --wan: the first host "
        "in site-a, the others in site-b)"
    )  # fmt: skip
    p.add_argument(
        "--wan", metavar="RTT,RATE", help="sites are joined by this emulated WAN, e.g. 150ms,100Mbit"
    )
    p.add_argument(
        "--lab", type=int, default=0, metavar="N", help="lab number 0-255 (several labs side by side)"
    )
    p.set_defaults(func=up_command)
    p = group.add_parser("down", help="stop the lab's agents and VMs and unmake it")
    p.add_argument("dir", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the directory (datastores, logs)")
    p.set_defaults(func=down_command)
    p = group.add_parser("status", help="the lab's hosts and agents")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status_command)


def _sites(args: argparse.Namespace, names: list[str]) -> list[str]:
    if args.sites:
        sites = [s.strip() for s in args.sites.split(",")]
        if len(sites) != len(names):
            raise ValueError(f"{len(sites)} sites for {len(names)} hosts")
        return sites
    if args.wan:
        return ["site-a"] + ["site-b"] * (len(names) - 1)
    return ["default"] * len(names)


def _wait_serving(
    url: str, token: str, ca: Path, proc: subprocess.Popen[bytes], log: Path, limit: float = 120
) -> None:
    import ssl

    import httpx

    verify = ssl.create_default_context(cafile=ca)

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"the agent at {url} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(
                f"{url}/v1/host", headers={"Authorization": f"Bearer {token}"}, timeout=10, verify=verify
            )
            if r.status_code == 200:
                return
        time.sleep(0.2)
    raise LabError(f"the agent at {url} did not answer within {limit:.0f} s")


def _start_etcd(plan: LabPlan, lab_dir: Path) -> EtcdMember:
    """The lab's etcd: one member on the gateway address (the root namespace's, on the lab's bridge:
    every host reaches it, nothing outside the machine does), data under the lab's directory."""
    import asyncio

    spec = MemberSpec(
        name=f"lab{plan.lab}",
        data_dir=lab_dir / "etcd",
        client_port=ETCD_PORTS[0],
        peer_port=ETCD_PORTS[1],
        host=plan.gateway,
        compaction_retention="1h",
    )
    member = EtcdMember(spec)
    try:
        member.start()
        asyncio.run(member.wait_healthy())
    except (EtcdProcessError, EtcdNotInstalled) as exc:
        member.stop_sync()
        raise LabError(f"the lab's etcd: {exc}") from None
    return member


def _stop_pid(pid: int, within: float = 20.0) -> None:
    """SIGTERM a process group, wait, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _start_agents(plan: LabPlan, lab_dir: Path, wan: str | None, etcd: str) -> list[dict[str, Any]]:
    from hikkoshi.cli.agent import ensure_token
    from hikkoshi.identity.authority import issue_host, make_ca

    token_file = lab_dir / "token"
    token = ensure_token(token_file)
    pki = lab_dir / "pki"
    ca = make_ca(pki / "ca", "hikkoshi lab CA")
    sites = sorted({h.site for h in plan.hosts})
    links = [f"{a}:{b}={wan}" for i, a in enumerate(sites) for b in sites[i + 1 :]] if wan else []
    hosts = []
    for h in plan.hosts:
        state = Path(tempfile.mkdtemp(prefix=f"hkl{plan.lab}{h.name}-", dir="/tmp"))  # short: sockets
        log = lab_dir / f"{h.name}.log"
        cmd = ["ip", "netns", "exec", h.netns, sys.executable, "-m", "hikkoshi", "agent", "--name", h.name]
        cmd += [
            "--listen",
            f"{h.address}:{AGENT_PORT}",
            "--datastore",
            f"main={lab_dir / h.name / 'datastore'}",
        ]
        ids = issue_host(pki / "ca", h.name, pki / h.name, [h.address])
        cmd += ["--cert", str(ids.cert), "--key", str(ids.key), "--ca", str(ids.ca)]
        cmd += ["--state-dir", str(state), "--token-file", str(token_file), "--site", h.site]
        cmd += ["--etcd", etcd]
        for link in links:
            cmd += ["--wan-link", link]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        url = f"https://{h.address}:{AGENT_PORT}"
        hosts.append(
            {"name": h.name, "site": h.site, "netns": h.netns, "address": h.address, "url": url,
             "pid": proc.pid, "state_dir": str(state), "datastore": str(lab_dir / h.name / "datastore")}
        )  # fmt: skip
        _wait_serving(url, token, ca, proc, log)
    return hosts


def up_command(args: argparse.Namespace) -> int:
    lab_dir = args.dir.absolute()
    plan: LabPlan | None = None
    hosts: list[dict[str, Any]] = []
    etcd: EtcdMember | None = None
    try:
        if os.geteuid() != 0:
            raise LabError("a lab needs root (network namespaces)")
        if (lab_dir / LAB_FILE).exists():
            raise LabError(f"{lab_dir} has a lab already (hikkoshi lab down {lab_dir})")
        names = [n.strip() for n in args.hosts.split(",") if n.strip()]
        plan = plan_lab(names, _sites(args, names), args.lab)
        if args.wan:
            from hikkoshi.cli.migrate import parse_wan

            parse_wan(args.wan)  # a clear error before anything is made
        lab_dir.mkdir(parents=True, exist_ok=True)
        run_ip(setup_commands(plan))
        record = {
            "lab": plan.lab,
            "bridge": plan.bridge,
            "gateway": plan.gateway,
            "wan": args.wan,
            "hosts": hosts,
        }
        etcd = _start_etcd(plan, lab_dir)
        record["etcd"] = {"url": etcd.spec.client_url, "pid": etcd.pid}
        hosts += _start_agents(plan, lab_dir, args.wan, etcd.spec.client_url)
        write_atomically(lab_dir / LAB_FILE, json.dumps(record, indent=2).encode())
    except (LabError, ValueError, OSError) as exc:
        print(f"hikkoshi lab up: {exc}", file=sys.stderr)
        _stop_agents(hosts)
        if etcd is not None:
            etcd.stop_sync()
        if plan is not None:
            run_ip(teardown_commands(plan), check=False)
        return 2
    print(f"lab {plan.lab} is up in {lab_dir} (bridge {plan.bridge}, {plan.gateway}/24)")
    for h in hosts:
        print(f"  {h['name']:10} site {h['site']:10} {h['url']}   (netns {h['netns']})")
    assert etcd is not None
    print(f"  etcd       {etcd.spec.client_url}   (pid {etcd.pid})")
    print(f"export HIKKOSHI_TOKEN_FILE={lab_dir / 'token'} HIKKOSHI_CA_FILE={lab_dir / 'pki/ca/ca-cert.pem'}")
    print(f"export HIKKOSHI_ETCD={etcd.spec.client_url}")
    return 0


def _stop_agents(hosts: list[dict[str, Any]]) -> None:
    for h in hosts:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(h["pid"]), signal.SIGTERM)
    for h in hosts:
        _stop_pid(int(h["pid"]), within=60)
        datastore = Path(h["datastore"])
        if datastore.exists():
            with contextlib.suppress(Exception):
                for entry in Datastore.open(datastore).entries():
                    if entry.home.is_running():
                        control.kill_vm(entry.home)
        shutil.rmtree(h["state_dir"], ignore_errors=True)


def _load(lab_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((lab_dir / LAB_FILE).read_text())
        return data
    except (OSError, ValueError) as exc:
        raise LabError(f"no lab in {lab_dir}: {exc}") from None


def down_command(args: argparse.Namespace) -> int:
    lab_dir = args.dir.absolute()
    try:
        lab = _load(lab_dir)
    except LabError as exc:
        print(f"hikkoshi lab down: {exc}", file=sys.stderr)
        return 2
    _stop_agents(lab["hosts"])
    if lab.get("etcd"):
        _stop_pid(int(lab["etcd"]["pid"]))
    names = [h["name"] for h in lab["hosts"]]
    plan = plan_lab(names, [h["site"] for h in lab["hosts"]], int(lab["lab"]))
    run_ip(teardown_commands(plan), check=False)
    if args.keep:
        (lab_dir / LAB_FILE).unlink()
    else:
        shutil.rmtree(lab_dir, ignore_errors=True)
    print(f"lab {lab['lab']} is down")
    return 0


def status_command(args: argparse.Namespace) -> int:
    try:
        lab = _load(args.dir.absolute())
    except LabError as exc:
        print(f"hikkoshi lab status: {exc}", file=sys.stderr)
        return 2
    for h in lab["hosts"]:
        h["agent_running"] = alive(int(h["pid"]))
    if args.json:
        print(json.dumps(lab, indent=2))
        return 0
    print(f"lab {lab['lab']}: bridge {lab['bridge']} {lab['gateway']}/24, WAN: {lab['wan'] or '-'}")
    if lab.get("etcd"):
        state = "running" if alive(int(lab["etcd"]["pid"])) else "NOT running"
        print(f"  etcd       {lab['etcd']['url']:39} {state} (pid {lab['etcd']['pid']})")
    for h in lab["hosts"]:
        state = "agent running" if h["agent_running"] else "agent NOT running"
        print(f"  {h['name']:10} site {h['site']:10} {h['url']:28} {state} (pid {h['pid']})")
    return 0
