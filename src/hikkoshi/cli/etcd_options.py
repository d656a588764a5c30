"""How commands are told where etcd is: ``--etcd URL[,URL...]`` (or ``$HIKKOSHI_ETCD``) and, for an etcd
that requires client certificates, ``--etcd-ca``/``--etcd-cert``/``--etcd-key`` (or
``$HIKKOSHI_ETCD_CA``/``_CERT``/``_KEY``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hikkoshi.cluster.config import EtcdConfig, EtcdTls


def add_etcd_tls_arguments(p: Any) -> None:
    """The TLS options of a command that talks to etcd."""
    for name, what in (
        ("ca", "CA of etcd's certificate"),
        ("cert", "client certificate"),
        ("key", "its key"),
    ):
        env = f"HIKKOSHI_ETCD_{name.upper()}"
        p.add_argument(
            f"--etcd-{name}",
            type=Path,
            metavar="F",
            default=Path(os.environ[env]) if os.environ.get(env) else None,
            help=f"etcd TLS: {what} (default: ${env})",
        )


def etcd_config(args: argparse.Namespace) -> EtcdConfig:
    """The etcd of ``--etcd`` and its TLS options. :class:`ValueError` if they do not fit together."""
    urls = str(args.etcd or "")
    tls = None
    secure = any(u.strip().startswith("https://") for u in urls.split(","))
    if args.etcd_ca is not None:
        tls = EtcdTls(ca_file=args.etcd_ca, cert_file=args.etcd_cert, key_file=args.etcd_key)
    elif args.etcd_cert is not None or args.etcd_key is not None:
        raise ValueError("--etcd-cert and --etcd-key need --etcd-ca")
    elif secure:
        raise ValueError("an https:// etcd needs --etcd-ca (and a client certificate if it asks for one)")
    for f in (args.etcd_ca, args.etcd_cert, args.etcd_key):
        if f is not None and not f.is_file():
            raise ValueError(f"{f}: no such file")
    return EtcdConfig.of(urls, tls=tls)
