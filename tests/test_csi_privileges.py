"""The FUSE servers run as the unprivileged server uid (65534) without capabilities, and the node
cache is theirs (0700). The repo's venv interpreter may live where uid 65534 cannot reach it
(/root is 0700 here), so this test runs the server through the system python3 of the same minor
version with the venv's site-packages on its path."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.local import Client, InProcessPlugin, PluginDirs, unmount_all_under
from csi.state import StateStore
from csi.v1 import csi_pb2 as pb
from tests.pods import objfs_command_for_nobody
from tests.servers import RcloneS3

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[tuple[Client, PluginDirs]]:
    root = tempfile.mkdtemp(prefix="objfs-csi-priv-")
    dirs = PluginDirs(root)
    command = objfs_command_for_nobody(Path(root) / "objfs-serve")
    if command is None:
        shutil.rmtree(root)
        pytest.skip("no interpreter uid 65534 can run objfs with here")
    try:
        extra = ["--server-uid", "65534", "--server-gid", "65534", "--server-command", command]
        with InProcessPlugin(dirs, node_id="node-p", extra_args=extra) as client:
            yield client, dirs
    finally:
        unmount_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_servers_run_unprivileged(unprivileged: tuple[Client, PluginDirs], s3_server: RcloneS3, bucket: str) -> None:
    client, dirs = unprivileged
    s3_server.client().put_object(Bucket=bucket, Key="a.txt", Body=b"A")
    parent = Path(dirs.root) / "pods" / "p1" / "volumes" / "kubernetes.io~csi" / "pv"
    parent.mkdir(parents=True)
    target = str(parent / "mount")
    mode = pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    req = pb.NodePublishVolumeRequest(
        volume_id="static-p", target_path=target,
        volume_capability=pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=mode),
        volume_context={"bucket": bucket, "endpoint": s3_server.endpoint},
        secrets={"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key})
    client.node.NodePublishVolume(req)
    try:
        (rec,) = StateStore(dirs.state).all()
        fields = status_fields(rec.pid)
        assert fields["Uid"].split() == ["65534"] * 4 and fields["Gid"].split() == ["65534"] * 4
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
        with open(f"/proc/{rec.pid}/environ", "rb") as f:
            assert s3_server.secret_key.encode() not in f.read()
        with open(f"/proc/{rec.pid}/cmdline", "rb") as f:
            assert s3_server.secret_key.encode() not in f.read()
        with open(os.path.join(target, "a.txt"), "rb") as f:
            assert f.read() == b"A"
        with open(os.path.join(target, "b.txt"), "wb") as f:
            f.write(b"B")
        assert s3_server.client().get_object(Bucket=bucket, Key="b.txt")["Body"].read() == b"B"
        st = os.stat(dirs.cache)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o700)
    finally:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="static-p", target_path=target))
    assert not os.path.exists(target)
