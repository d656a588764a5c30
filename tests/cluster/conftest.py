"""Fixtures: real etcd members on free loopback ports, stopped by pid whatever happens."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.etcd_process import EtcdMember, LocalCluster
from hikkoshi.cluster.keys import Keys
from tests.support.etcd import cluster_running, member_running


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """One etcd member shared by a test module (tests keep apart by key roots)."""
    with member_running(tmp_path_factory.mktemp("etcd")) as member:
        yield member


@pytest.fixture
def config(etcd: EtcdMember) -> EtcdConfig:
    return EtcdConfig((etcd.spec.endpoint,), attempt_timeout=2.0, deadline=8.0)


@pytest.fixture
def keys() -> Keys:
    """A key root of this test's own."""
    return Keys(f"/test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three members on loopback, stopped by pid after the test."""
    with cluster_running(tmp_path / "etcd3", 3) as cluster:
        yield cluster
