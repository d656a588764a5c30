"""`hikkoshi nbd proxy`: serve a disk at once from a local cache while relocating it from an upstream."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.nbd_limits import add_limit_arguments, limits_from_args

if TYPE_CHECKING:  # the daemon's modules load only when a proxy runs: parsing stays quick
    from hikkoshi.daemons.proxy_service import ProxySettings


def add_parser(sub: Any) -> None:
    p = sub.add_parser("proxy", help="serve a disk from a local cache, relocating it from an upstream export")
    p.add_argument("--upstream", required=True, metavar="URI", help="the source export (nbd://, nbd+unix://)")
    p.add_argument(
        "--cache", required=True, type=Path, metavar="PATH", help="local cache file (bitmap: PATH.bitmap)"
    )
    p.add_argument(
        "--listen", action="append", metavar="ADDR", help="HOST:PORT or unix:PATH (default 127.0.0.1:10809)"
    )
    p.add_argument("--export", metavar="NAME", help="export name (default: the upstream's)")
    p.add_argument(
        "--control", metavar="unix:PATH", help="JSON control socket (status, pause, resume, bandwidth)"
    )
    p.add_argument(
        "--block-size", default="64K", metavar="SIZE", help="cache block size, 4K..1M (default 64K)"
    )
    p.add_argument("--no-background", action="store_true", help="fetch only what the guest reads")
    p.add_argument(
        "--start-paused", action="store_true", help="background copy starts paused (control: resume)"
    )
    p.add_argument(
        "--dirty-bitmap",
        metavar="NAME",
        help="the upstream's dirty bitmap NAME (meta context hikkoshi:dirty:NAME) tracks writes made "
        "there after this proxy started; the upstream is kept until the control command 'invalidate' "
        "has dropped the cached blocks it names",
    )
    p.add_argument("--bandwidth", metavar="RATE", help="limit the background copy, e.g. 50M, 100Mbit")
    p.add_argument(
        "--size",
        type=int,
        metavar="BYTES",
        help="the upstream's size, if known: serve at once and connect meanwhile (reads that need the "
        "upstream wait for it; an upstream of another size ends the proxy before any is sent)",
    )
    p.add_argument("--connections", type=int, default=4, help="upstream connections if it allows multi-conn")
    p.add_argument(
        "--upstream-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long a request waits for an unreachable upstream before EIO (default 30)",
    )
    p.add_argument(
        "--skip-fs-free",
        action="store_true",
        help="do not copy blocks an ext2/3/4 file system on the disk reports free (they become zeroes)",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="this host's TLS files in QEMU's layout, for an nbds:// upstream (its certificate is shown, "
        "the upstream's checked against that CA)",
    )
    add_limit_arguments(p)
    p.set_defaults(func=proxy_command)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise ValueError(f"bad size {text!r}") from None


def proxy_settings(args: argparse.Namespace) -> ProxySettings:
    """The proxy's settings from its options."""
    from hikkoshi.block.throttle import parse_rate
    from hikkoshi.daemons.proxy_service import ProxySettings
    from hikkoshi.daemons.relocation import RelocationOptions
    from hikkoshi.identity.tls_dir import TlsDir
    from hikkoshi.nbd.server import ListenAddress
    from hikkoshi.nbd.uri import NbdUri

    tls = TlsDir(args.tls_dir.absolute()).check().client_context() if args.tls_dir else None

    return ProxySettings(
        upstream=NbdUri.parse(args.upstream),
        cache=args.cache,
        listen=[ListenAddress.parse(a) for a in (args.listen or ["127.0.0.1:10809"])],
        export=args.export,
        control=Path(args.control.removeprefix("unix:")) if args.control else None,
        size=args.size,
        limits=limits_from_args(args),
        describe_upstream=args.describe_paths,
        options=RelocationOptions(
            block_size=parse_size(args.block_size),
            connections=args.connections,
            upstream_timeout=args.upstream_timeout,
            background=not args.no_background,
            start_paused=args.start_paused,
            dirty_bitmap=args.dirty_bitmap,
            bandwidth=parse_rate(args.bandwidth) if args.bandwidth else None,
            skip_fs_free=args.skip_fs_free,
            tls=tls,
        ),
    )


def proxy_command(args: argparse.Namespace) -> int:
    from hikkoshi.block.bitmap_file import BitmapMismatch
    from hikkoshi.daemons.process import run_reporting
    from hikkoshi.daemons.proxy_service import run_proxy

    async def main() -> int:
        return await run_proxy(proxy_settings(args))

    return run_reporting(main(), "hikkoshi nbd proxy", (OSError, ValueError, BitmapMismatch))
