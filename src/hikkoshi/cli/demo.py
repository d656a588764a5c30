"""`hikkoshi demo`: the main job. Until live migration exists: serve an image and check it with qemu-img."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the demonstration")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.set_defaults(func=demo_command)


def _run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.rstrip(), flush=True)
    return out


def demo_command(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="hikkoshi-demo-"))
    image = work / "disk.raw"
    copy = work / "copy.raw"
    server: subprocess.Popen[str] | None = None
    try:
        # A 256 MiB sparse disk with data in a few places, so holes and data both show.
        with open(image, "wb") as f:
            f.truncate(256 << 20)
            for i in range(0, 256, 32):
                f.seek(i << 20)
                f.write(os.urandom(1 << 20))
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hikkoshi",
                "nbd",
                "serve",
                str(image),
                "--export",
                "disk",
                "--listen",
                "127.0.0.1:0",
                "--control",
                f"unix:{work / 'control.sock'}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        if not line.startswith("hikkoshi: serving "):
            print("demo: the server did not start", file=sys.stderr)
            return 1
        uri = line.removeprefix("hikkoshi: serving ").rstrip("/") + "/disk"
        print(f"demo: serving {image} at {uri}")
        _run(["qemu-img", "info", "-f", "raw", uri])
        _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri])
        _run(["qemu-img", "convert", "-p", "-f", "raw", "-O", "raw", uri, str(copy)])
        _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(copy)])
        if shutil.which("nbdinfo"):
            _run(["nbdinfo", "--map", uri])
        _run([sys.executable, "-m", "hikkoshi", "nbd", "stats", "--control", f"unix:{work / 'control.sock'}"])
        print("demo: OK — the image served by hikkoshi matches the file, byte for byte")
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"demo: FAILED: {' '.join(map(str, exc.cmd))}\n{exc.stderr}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
