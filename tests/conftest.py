"""Shared fixtures: real object stores on loopback, started once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusefs.config import MountConfig
from tests.fsmount import Mounted
from tests.fsmount import mount as fs_mount
from tests.proxy import CountingProxy
from tests.servers import MotoS3, RcloneS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3]:
    """One ``rclone serve s3`` for the whole session; each test gets its own bucket."""
    with RcloneS3(tmp_path_factory.mktemp("s3") / "data") as server:
        yield server


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """One moto S3 server for the session (buckets that keep versions); each test its own bucket."""
    with MotoS3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def bucket(s3_server: RcloneS3) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def s3_config(s3_server: RcloneS3, bucket: str, tmp_path: Path) -> MountConfig:
    """A MountConfig for a fresh bucket, with a node cache in this test's temp dir."""
    return MountConfig(
        backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
        credentials=s3_server.credentials, cache_dir=str(tmp_path / "cache"),
    )


# -- FUSE mounts (fusefs core) ----------------------------------------------------------------
@pytest.fixture
def counting_proxy(s3_server: RcloneS3) -> Iterator[CountingProxy]:
    """A request-counting proxy in front of the session's S3 server."""
    with CountingProxy(s3_server.port) as proxy:
        yield proxy


@pytest.fixture
def mount_fs(tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """``mount_fs(config, name='mnt')``: a real FUSE mount served by ``objfs serve`` on an fd this
    test mounted; every mount is lazily unmounted at teardown."""
    made: list[Mounted] = []

    def make(config: MountConfig, name: str = "mnt", env: dict[str, str] | None = None) -> Mounted:
        m = fs_mount(config, tmp_path / name, tmp_path / f"{name}.log", env)
        made.append(m)
        return m

    yield make
    for m in made:
        m.unmount()


# -- figures of the fault tests (tests/figures.py) ----------------------------------------------
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests import figures

    lines = figures.summary_lines()
    if lines:
        terminalreporter.section("faults injected and bytes verified")
        for line in lines:
            terminalreporter.write_line(line)
        figures.write_summary()
        terminalreporter.write_line(f"(written to {figures.SUMMARY})")
