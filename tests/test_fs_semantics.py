"""What everyday tools do to a volume (``cp -a``, ``rsync -a``, ``tar``, ``touch``, ``ln``,
``mknod``, ``mkdir`` then write), through real FUSE mounts on real stores."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable

import pytest

from fusefs.config import MountConfig
from tests.fsmount import Mounted
from tests.servers import RcloneS3

pytestmark = pytest.mark.fuse


def test_chmod_chown_that_change_nothing_succeed(s3_config: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
    m = mount_fs(s3_config)
    f = m.path / "f"
    f.write_bytes(b"x")
    st = os.stat(f)
    os.chmod(f, stat.S_IMODE(st.st_mode))
    os.chown(f, st.st_uid, st.st_gid)
    os.chmod(m.path, stat.S_IMODE(os.stat(m.path).st_mode))
    with pytest.raises(PermissionError):
        os.chmod(f, stat.S_IMODE(st.st_mode) ^ 0o100)
    with pytest.raises(PermissionError):
        os.chown(f, st.st_uid + 1, -1)
    assert os.stat(f).st_mode == st.st_mode
    assert "refused (EPERM)" in m.log_text()


def test_links_and_special_files_are_eperm_and_mknod_of_a_file_works(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    (m.path / "a").write_bytes(b"a")
    for make in (lambda: os.link(m.path / "a", m.path / "hard"),
                 lambda: os.mkfifo(m.path / "fifo"),
                 lambda: os.mknod(m.path / "dev", 0o644 | stat.S_IFCHR, os.makedev(1, 3))):
        with pytest.raises(OSError) as caught:
            make()
        assert caught.value.errno == errno.EPERM
    os.mknod(m.path / "plain", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(m.path / "plain").st_mode)
    assert s3_server.read_object(s3_config.bucket, "plain") == b""
    with pytest.raises(FileExistsError):
        os.mknod(m.path / "plain", 0o644 | stat.S_IFREG)
    assert sorted(os.listdir(m.path)) == ["a", "plain"]


def test_directory_times_are_not_1970(s3_config: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
    before = time.time() - 5
    m = mount_fs(s3_config)
    assert os.stat(m.path).st_mtime > before
    os.mkdir(m.path / "d")
    assert os.stat(m.path / "d").st_mtime > before
    (m.path / "e.txt").write_bytes(b"e")
    os.listdir(m.path)
    assert os.stat(m.path).st_mtime > before  # its newest entry's
    out = subprocess.run(["ls", "-ld", "--time-style=+%Y", str(m.path), str(m.path / "d")], check=True,
                         capture_output=True, text=True).stdout
    assert "1970" not in out
