"""Fixtures the tests share. Helpers that are plain functions are in support.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dcache.localcluster import EtcdServer


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A real etcd on loopback, with a throwaway data folder."""
    server = EtcdServer()
    server.start()
    yield server
    server.close()
