"""The CLI's tests run with none of the user's environment: each says where the cluster or the agent is."""

from __future__ import annotations

import pytest

OWN_ENV = ("HIKKOSHI_ETCD", "HIKKOSHI_AGENT", "HIKKOSHI_TOKEN_FILE", "HIKKOSHI_CA_FILE")


@pytest.fixture(autouse=True)
def own_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OWN_ENV:
        monkeypatch.delenv(name, raising=False)
