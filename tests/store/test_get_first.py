"""``BlockingStore.get_first``: an object's description as HEAD gives it (size, version, user
metadata, mtime) and its first bytes, of one version, on real servers: moto's S3 and ``rclone
serve s3`` (one ranged GetObject each), fake-gcs-server (HEAD, then a ranged GET pinned to its
generation), and the memory store the layer tests use."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fusefs import errors
from fusefs.config import MountConfig
from fusefs.store import open_store
from fusefs.store.base import BlockingStore
from fusefs.store.memory import MemoryStore
from testing.servers import FakeGCS, random_bytes


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[FakeGCS]:
    with tempfile.TemporaryDirectory(prefix="objfs-gcs-first-") as d, FakeGCS(Path(d)) as server:
        yield server


@pytest.fixture(params=["moto", "rclone", "gcs", "memory"])
def store(request: pytest.FixtureRequest) -> BlockingStore:
    if request.param == "memory":
        return MemoryStore("first")
    server: Any = request.getfixturevalue({"moto": "moto_server", "rclone": "s3_server",
                                           "gcs": "gcs_server"}[request.param])
    return open_store(MountConfig(backend="gcs" if request.param == "gcs" else "s3", bucket=server.create_bucket(),
                                  endpoint_url=server.endpoint, credentials=server.credentials))


def test_get_first_describes_the_object_as_head_does(store: BlockingStore) -> None:
    data = random_bytes(300_000, 5)
    store.put("d/f", data, {"mtime": "1000000000.5", "mode": "33152"})
    store.put("d/empty", b"", {"mode": "33188"})
    head = store.head("d/f")
    for length in (1, 1000, len(data), len(data) + 4096):
        info, first = store.get_first("d/f", length)
        assert info == head
        assert bytes(first) == data[:length]
    direct = getattr(store, "direct", None)
    if direct is not None:  # S3: after botocore's first GET, the rest skipped its pipeline (s3_get)
        assert direct.sent >= 3
    info, first = store.get_first("d/empty", 64)  # no byte 0 to range over (S3: 416): still described
    assert (info, bytes(first)) == (store.head("d/empty"), b"")
    with pytest.raises(errors.NotFoundError):
        store.get_first("d/nothing", 64)
