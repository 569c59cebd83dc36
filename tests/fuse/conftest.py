"""Fixtures of the FUSE tests: the S3 stores a write test runs on, and where in them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusefs.config import MountConfig
from testing.servers import MotoS3, RcloneS3


@dataclass
class S3Target:
    """An S3 store a write test runs on, and the folder it writes in.

    ``rclone serve s3`` over a local folder stores the ``d/`` marker that ``mkdir d`` writes as
    a file ``d``, after which every write under ``d/`` fails (HTTP 500): there the tests write in
    the bucket's root. moto's server keeps markers beside the keys under them, as S3 and GCS do:
    there the same tests first ``mkdir`` two levels through the mount and write inside them."""

    name: str
    server: RcloneS3 | MotoS3
    config: MountConfig
    folder: str  # "" (the root) or "a/b", made by ``under``

    def under(self, mount: Path) -> Path:
        """The folder in ``mount``, made there now (mkdir of each level, through the mount)."""
        if not self.folder:
            return mount
        path = mount
        for name in self.folder.split("/"):
            path = path / name
            os.mkdir(path)
        return path

    def key(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name

    def read(self, name: str) -> bytes:
        return bytes(self.server.read_object(self.config.bucket, self.key(name)))

    def keys(self) -> list[str]:
        """The bucket's keys under the folder, relative to it (directory markers left out)."""
        prefix = self.key("")
        r = self.server.client().list_objects_v2(Bucket=self.config.bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for o in r.get("Contents", []) if not o["Key"].endswith("/"))


@pytest.fixture(params=["rclone", "moto"])
def s3_target(request: pytest.FixtureRequest, tmp_path: Path) -> S3Target:
    """Each S3 store in turn, with a fresh bucket (see ``S3Target``)."""
    server: RcloneS3 | MotoS3 = request.getfixturevalue("s3_server" if request.param == "rclone" else "moto_server")
    config = MountConfig(backend="s3", bucket=server.create_bucket(), endpoint_url=server.endpoint,
                         credentials=server.credentials, cache_dir=str(tmp_path / "cache"))
    return S3Target(request.param, server, config, "" if request.param == "rclone" else "work/in")
