"""The DRS benchmark runner at a small scale: its three parts run and write their results."""

from __future__ import annotations

import json
from pathlib import Path

from bench.run_drs import main


def test_the_benchmark_at_a_small_scale(tmp_path: Path) -> None:
    assert main(["--hosts", "30", "--vms", "600", "--repeat", "1", "--output-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("drs-*.json")
    results = json.loads(path.read_text())
    plan = results["plan"]["skewed, max_moves=32"]
    assert plan["moves"] > 0 and plan["imbalance_after"] < plan["imbalance_before"]
    for converged in results["converge"].values():
        assert converged["under_tolerance"] and converged["rounds_with_moves"] <= 12
    m = results["maintenance"]
    assert m["complete"] and m["moves"] == m["vms_on_them"] and m["hosts_taking_vms"] > 1
    assert "Floor: skewed plan median" in results["markdown"]
