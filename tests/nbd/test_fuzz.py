"""A few thousand cases of the NBD fuzz (bench/run_fuzz.py, which runs 100,000 and more) against a real
server: no crash, no hang, nothing logged as an error, health checks pass, and qemu-img agrees with the
image file afterwards."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bench.fuzz_cases import FAMILIES
from bench.run_fuzz import Target, fuzz, make_image, qemu_img_compare

CASES = 3000
SEED = 20261207


def test_fuzz_subset(tmp_path: Path) -> None:
    image = tmp_path / "fuzz.raw"
    make_image(image, SEED)
    target = Target([sys.executable, "-m", "hikkoshi"], image, tmp_path)
    target.start()
    try:
        tally = asyncio.run(fuzz(SEED, 0, CASES, target, workers=16, hang_after=10, check_every=1000))
        assert qemu_img_compare(target)
    finally:
        target.stop()
    log = target.log.read_text(errors="replace")
    assert tally.cases == CASES and set(tally.by_family) == set(FAMILIES)
    assert (tally.crashes, tally.hangs, tally.server_errors, tally.refused) == (0, 0, 0, 0), (
        tally,
        log[-3000:],
    )
    assert tally.health_failures == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
