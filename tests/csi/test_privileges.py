"""The FUSE servers run as the unprivileged server uid (65534) without capabilities; the node's data
service runs as a uid of its own (65532), also without capabilities, and the node cache is its
alone (0700): the servers never see it. The repo's venv interpreter may live where uid 65534 cannot reach it
(/root is 0700 here), so this test runs the server through the system python3 of the same minor
version with the venv's site-packages on its path."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.node.state import StateStore
from csi.v1 import csi_pb2 as pb
from testing.plugin import Client, InProcessPlugin, PluginDirs, unmount_all_under
from testing.pods import objfs_command_for_nobody
from testing.servers import RcloneS3, random_bytes

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
        extra = ["--server-uid", "65534", "--server-gid", "65534", "--data-uid", "65532", "--data-gid", "65532",
                 "--server-command", command]
        with InProcessPlugin(dirs, node_id="node-p", extra_args=extra) as client:
            yield client, dirs
    finally:
        unmount_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def data_service_pid(dirs: PluginDirs) -> int:
    """The node's data service the plugin (this process, from any of its threads) started for ``dirs``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(status_fields(int(name))["PPid"])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, KeyError, ValueError):
            continue
        if ppid == os.getpid() and b"data-service" in cmdline and dirs.cache.encode() in cmdline:
            return int(name)
    raise AssertionError("no data service running")


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
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65532, 0o700)
        service = status_fields(data_service_pid(dirs))
        assert service["Uid"].split() == ["65532"] * 4 and service["Gid"].split() == ["65532"] * 4
        assert int(service["CapEff"], 16) == 0 and int(service["CapPrm"], 16) == 0
    finally:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="static-p", target_path=target))
    assert not os.path.exists(target)


def _files_under(root: str) -> list[str]:
    found = []
    for dirpath, _dirs, names in os.walk(root):
        found += [os.path.join(dirpath, n) for n in names]
    return found


def test_secrets_stay_out_of_logs_files_and_errors_and_the_cache_is_private(
    unprivileged: tuple[Client, PluginDirs], s3_server: RcloneS3, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What test_servers_run_unprivileged does not cover: the inheritable and ambient capability
    sets, a failed publish's secrets (error details, the plugin's log, the server's log file), every
    file under the plugin's state, cache and log dirs, and the node cache's modes after real reads."""
    caplog.set_level(logging.DEBUG)
    client, dirs = unprivileged
    big = random_bytes(9 * 1024 * 1024 + 5, 13)  # over one 8 MiB block: a whole-object data file
    s3_server.client().put_object(Bucket=bucket, Key="big.bin", Body=big)
    s3_server.client().put_object(Bucket=bucket, Key="small.txt", Body=b"small")
    wrong = "WRONG-secret-" + secrets.token_hex(8)
    token = "TOKEN-" + secrets.token_hex(8)
    secret_values = [s3_server.secret_key, wrong, token]
    mode = pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=mode)

    def publish(name: str, secret: str, session: str = "") -> str:
        parent = Path(dirs.root) / "pods" / name / "volumes" / "kubernetes.io~csi" / "pv"
        parent.mkdir(parents=True)
        target = str(parent / "mount")
        given = {"accessKeyID": s3_server.access_key, "secretAccessKey": secret}
        if session:
            given["sessionToken"] = session
        client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=f"static-{name}", target_path=target, volume_capability=cap, readonly=True,
            volume_context={"bucket": bucket, "endpoint": s3_server.endpoint}, secrets=given))
        return target

    with pytest.raises(grpc.RpcError) as failed:  # the store refuses the key pair: an error said, no secret in it
        publish("p-wrong", wrong, token)
    assert failed.value.code() != grpc.StatusCode.UNKNOWN
    assert not any(s in (failed.value.details() or "") for s in secret_values)
    target = publish("p-ok", s3_server.secret_key)
    try:
        assert (Path(target) / "big.bin").read_bytes() == big
        assert (Path(target) / "small.txt").read_bytes() == b"small"
        (rec,) = [r for r in StateStore(dirs.state).all() if r.target == target]
        fields = status_fields(rec.pid)
        assert int(fields["CapInh"], 16) == 0 and int(fields["CapAmb"], 16) == 0
        # the server writes cache entries in the background: wait for the big object's data file
        # (complete files are 0400 too: tests/nodecache/test_objectfiles.py)
        deadline = time.monotonic() + 60
        while not list(Path(dirs.cache).rglob("objects/*/*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        cache_paths = [dirs.cache, *(os.path.join(d, n) for d, ds, fs in os.walk(dirs.cache) for n in ds + fs)]
        assert any("/objects/" in p for p in cache_paths) and any(p.endswith(".val") for p in cache_paths)
        for path in cache_paths:  # not group/other readable (or writable): the cache holds tenants' bytes
            st = os.lstat(path)
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (path, oct(st.st_mode))
            assert st.st_uid == 65532, path  # the data service's, never the servers' uid
        for path in _files_under(dirs.root):
            if os.path.commonpath([path, dirs.cache]) == dirs.cache or not os.path.isfile(path):
                continue  # object bytes, checked above; sockets
            with open(path, "rb") as f:
                content = f.read()
            assert not any(s.encode() in content for s in secret_values), path
            if stat.S_IMODE(os.stat(path).st_mode) & 0o004:  # what other users can read holds nothing secret
                assert s3_server.access_key.encode() not in content, path
        for pid in [rec.pid, os.getpid(), data_service_pid(dirs)]:  # the server, the plugin (this process), the service
            for what in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    content = f.read()
                assert not any(s.encode() in content for s in secret_values), (pid, what)
        assert not any(s in caplog.text for s in secret_values)  # the plugin's own log
    finally:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="static-p-ok", target_path=target))
