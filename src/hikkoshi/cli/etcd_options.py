"""How commands are told where etcd is: ``--etcd URL[,URL...]`` (or ``$HIKKOSHI_ETCD``) and, for an etcd
that requires client certificates, ``--etcd-ca``/``--etcd-cert``/``--etcd-key`` (or
``$HIKKOSHI_ETCD_CA``/``_CERT``/``_KEY``).

The options are global (``hikkoshi --etcd URL vm list``); ``hikkoshi agent`` takes them after its name
too. Which way a command goes: ``--agent`` and ``--etcd`` given together are refused; ``--etcd`` (or
``$HIKKOSHI_ETCD``, unless ``--agent`` is given) takes a cluster-aware command through the cluster;
else ``--agent``/``$HIKKOSHI_AGENT`` through one agent; else locally.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hikkoshi.cluster.config import EtcdConfig, EtcdTls

ETCD_ENV = "HIKKOSHI_ETCD"


def add_etcd_arguments(p: Any, *, defaults: bool = True) -> None:
    """``--etcd`` and its TLS options. ``defaults=False``: for a subcommand repeating the global
    options (what it is not given stays as the global options left it)."""
    p.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        default=None if defaults else argparse.SUPPRESS,
        help=f"etcd client URLs: work on the cluster (default: ${ETCD_ENV})",
    )
    add_etcd_tls_arguments(p, defaults=defaults)


def add_etcd_tls_arguments(p: Any, *, defaults: bool = True) -> None:
    """The TLS options of a command that talks to etcd."""
    for name, what in (
        ("ca", "CA of etcd's certificate"),
        ("cert", "client certificate"),
        ("key", "its key"),
    ):
        env = f"HIKKOSHI_ETCD_{name.upper()}"
        default: Any = Path(os.environ[env]) if os.environ.get(env) else None
        p.add_argument(
            f"--etcd-{name}",
            type=Path,
            metavar="F",
            default=default if defaults else argparse.SUPPRESS,
            help=f"etcd TLS: {what} (default: ${env})",
        )


def etcd_urls(args: argparse.Namespace) -> str | None:
    """The etcd URLs of ``--etcd``, else of ``$HIKKOSHI_ETCD``; None if neither."""
    return getattr(args, "etcd", None) or os.environ.get(ETCD_ENV) or None


def cluster_wanted(args: argparse.Namespace) -> bool:
    """Whether a cluster-aware command goes through the cluster (see the module's docstring).

    :class:`ValueError` if both ``--agent`` and ``--etcd`` are given."""
    agent, etcd = getattr(args, "agent", None), getattr(args, "etcd", None)
    if agent and etcd:
        raise ValueError(
            "--agent and --etcd: give one (a cluster's commands find each VM's agent themselves)"
        )
    return bool(etcd) or (not agent and bool(os.environ.get(ETCD_ENV)))


def etcd_config(
    args: argparse.Namespace, *, attempt_timeout: float = 2.0, deadline: float = 10.0
) -> EtcdConfig:
    """The etcd of ``--etcd`` and its TLS options. :class:`ValueError` if they do not fit together."""
    urls = etcd_urls(args) or ""
    if not urls.strip():
        raise ValueError(f"which etcd? give --etcd URL[,URL...] or set {ETCD_ENV}")
    ca, cert, key = (getattr(args, f"etcd_{n}", None) for n in ("ca", "cert", "key"))
    tls = None
    secure = any(u.strip().startswith("https://") for u in urls.split(","))
    if ca is not None:
        tls = EtcdTls(ca_file=ca, cert_file=cert, key_file=key)
    elif cert is not None or key is not None:
        raise ValueError("--etcd-cert and --etcd-key need --etcd-ca")
    elif secure:
        raise ValueError("an https:// etcd needs --etcd-ca (and a client certificate if it asks for one)")
    for f in (ca, cert, key):
        if f is not None and not f.is_file():
            raise ValueError(f"{f}: no such file")
    return EtcdConfig.of(urls, tls=tls, attempt_timeout=attempt_timeout, deadline=deadline)
