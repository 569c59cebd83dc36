"""A malicious sidecar: a process that takes the hand-over exactly as the real ``objfs sidecar`` does
(``fusefs.wire.handoff``, from the real node plugin) and then tries to get more than its own volume.

Everything inside a pod is its tenant's: they can exec into the injected sidecar, replace it, or run
it as root in the pod. What the plugin gives it must be worth no more than the pod's own volume
(../shared/DESIGN.md, "Trust boundary"). The "pod" here is a mount + PID namespace of its own with
the plugin's directories hidden (``testing.pods.SidecarPod``), as uid 65534 and as root. It reports
what it found to a file in its emptyDir; each attack must have failed:

- the descriptors it received are the mounted /dev/fuse and one socket: no directory fd, so no
  ``openat(fd, "..")`` into the node's mount tree (the escape a cache or broker dir fd allowed);
- the mount config holds no credential, no endpoint and no node path (it held the Secret before);
- through its grant connection it reaches only its own prefix: another tenant's object, listing,
  ranged read, block read or a copy in or out is refused by the data service; its read-only volume
  takes no write;
- the node cache, the plugin's state (grant records) and its broker are nowhere in its view.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.plugin import PluginDirs, PluginProcess, unmount_all_under
from testing.pods import FakeKubelet, SidecarPod, script_for_nobody, wait_for
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse

EVIL_SIDECAR = r"""
import json, os, socket, stat, sys
import trio
from fusefs.wire import handoff
from fusefs.store.base import ObjectInfo
from fusefs.wire.grant import GrantClient

d = sys.argv[sys.argv.index("--dir") + 1]
with open(os.path.join(d, "probe.json")) as f:
    probe = json.load(f)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
dirfd = os.open(d, os.O_PATH)  # kubelet's paths are longer than a socket path may be
listener.bind(f"/proc/self/fd/{dirfd}/objfs.sock")
listener.listen(1)
conn, _ = listener.accept()
handoff.send_hello(conn, d)
request = handoff.receive_request(conn)
vol = request.volume
report = {"config": json.loads(vol.config.to_json()), "fds": {}}
for name, fd in (("fuse", vol.fuse_fd), ("grant", vol.grant_fd)):
    mode = os.fstat(fd).st_mode
    kind = "chr" if stat.S_ISCHR(mode) else "sock" if stat.S_ISSOCK(mode) else "dir" if stat.S_ISDIR(mode) else "other"
    try:
        os.close(os.open("..", os.O_RDONLY, dir_fd=fd))
        climbed = "climbed"
    except OSError as exc:
        climbed = exc.errno
    report["fds"][name] = [kind, climbed]
report["visible"] = {p: os.path.exists(p) for p in probe["paths"]}

async def attack():
    results = {}
    async with GrantClient(socket.socket(fileno=vol.grant_fd), None, reconnect_wait=5) as c:
        other = ObjectInfo(probe["other_key"], probe["other_size"], "x", 0.0)
        tries = {
            "own_head": lambda: c.head(probe["own_key"]),
            "other_head": lambda: c.head(probe["other_key"]),
            "other_list": lambda: c.list(probe["other_prefix"], "/"),
            "bucket_list": lambda: c.list("", "/"),
            "sibling_list": lambda: c.list(probe["own_prefix"][:-1], "/"),
            "other_range": lambda: c.get_range(probe["other_key"], 0, 4),
            "other_block": lambda: c.read_block(other, 0),
            "own_put": lambda: c.put(probe["own_prefix"] + "w.txt", b"x"),
            "copy_out": lambda: c.copy(probe["own_key"], probe["other_prefix"] + "stolen"),
            "copy_in": lambda: c.copy(probe["other_key"], probe["own_prefix"] + "stolen"),
            "delete_other": lambda: c.delete(probe["other_key"]),
        }
        for name, attempt in tries.items():
            try:
                await attempt()
                results[name] = "allowed"
            except Exception as exc:
                results[name] = type(exc).__name__
    return results

report["grant"] = trio.run(attack)
conn.send(b"ready\n")
with open(os.path.join(d, "report.json.tmp"), "w") as f:
    json.dump(report, f)
os.rename(os.path.join(d, "report.json.tmp"), os.path.join(d, "report.json"))
"""


@pytest.fixture
def node() -> Iterator[tuple[Path, PluginDirs, FakeKubelet, str]]:
    root = Path(tempfile.mkdtemp(prefix="objfs-evil-"))
    os.chmod(root, 0o755)
    command = script_for_nobody(root / "evil-sidecar", EVIL_SIDECAR)
    if command is None:
        shutil.rmtree(root)
        pytest.skip("no interpreter uid 65534 can run objfs with here")
    try:
        yield root, PluginDirs(str(root / "plugin")), FakeKubelet(root / "kubelet"), command
    finally:
        unmount_all_under(str(root))
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("as_root", [False, True], ids=["uid 65534", "root in the pod"])
def test_a_sidecar_gets_nothing_but_its_own_volume(
        node: tuple[Path, PluginDirs, FakeKubelet, str], s3_server: RcloneS3, bucket: str, as_root: bool) -> None:
    root, dirs, kubelet, command = node
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="tenant-a/weights.bin", Body=b"a's weights")
    s3.put_object(Bucket=bucket, Key="tenant-b/data.txt", Body=b"b's data")
    objfs = script_for_nobody(root / "objfs", "from fusefs.proc.cli import main\nsys.exit(main())\n")
    assert objfs is not None
    plugin = PluginProcess(dirs, node_id="node-evil", pid_namespace=True, extra_args=[
        "--launcher", "sidecar", "--kubelet-root", str(kubelet.root), "--server-uid", "65534", "--server-gid",
        "65534", "--data-uid", "65532", "--data-gid", "65532", "--server-command", objfs, "--sidecar-wait", "1"])
    client = plugin.start()
    pod: SidecarPod | None = None
    try:
        uid = kubelet.new_pod()
        probe = {"own_key": "tenant-b/data.txt", "own_prefix": "tenant-b/", "other_key": "tenant-a/weights.bin",
                 "other_prefix": "tenant-a/", "other_size": 11,
                 "paths": [dirs.cache, dirs.state, *(os.path.join(dirs.state, d) for d in ("grants", "broker"))]}
        (kubelet.empty_dir(uid) / "probe.json").write_text(json.dumps(probe))
        pod = SidecarPod(kubelet.empty_dir(uid), command, hide=[Path(dirs.root)], as_root=as_root).start()
        secrets = {"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key}
        kubelet.publish(client, uid, "pv-b", "vol-b", {"bucket": bucket, "prefix": "tenant-b",
                                                          "endpoint": s3_server.endpoint}, secrets, readonly=True)
        report_path = kubelet.empty_dir(uid) / "report.json"
        wait_for(report_path.exists, what="the malicious sidecar's report")
        report = json.loads(report_path.read_text())
    finally:
        client.close()
        plugin.kill()
        if pod is not None:
            pod.close()

    config = report["config"]
    assert all(v is None for v in config["credentials"].values()), config["credentials"]
    assert config["endpoint_url"] is None and config["cache_dir"] is None and config["broker_socket"] == ""
    text = json.dumps(report)
    assert s3_server.secret_key not in text and s3_server.access_key not in text
    assert report["fds"] == {"fuse": ["chr", 20], "grant": ["sock", 20]}  # ENOTDIR: nothing to climb from
    assert not any(report["visible"].values()), report["visible"]
    assert report["grant"] == {
        "own_head": "allowed",
        "other_head": "AccessDeniedError", "other_list": "AccessDeniedError", "bucket_list": "AccessDeniedError",
        "sibling_list": "AccessDeniedError", "other_range": "AccessDeniedError", "other_block": "AccessDeniedError",
        "own_put": "ReadOnlyError", "copy_out": "ReadOnlyError", "copy_in": "AccessDeniedError",
        "delete_other": "ReadOnlyError",
    }, report["grant"]
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {"tenant-a/weights.bin", "tenant-b/data.txt"}
