"""The trust boundary on a real node (issue 21, ../shared/DESIGN.md "Trust boundary"): everything inside
a workload pod is its tenant's, the injected objfs-sidecar included. A tenant who `kubectl exec`s into
their pod's sidecar, as that sidecar's own user, looks for what the old design handed it (the node
cache bind-mounted at /objfs-tmp/cache with O_PATH fds of the cache, the StorageClass's Secret in the
MountConfig) and must find nothing of the node and nothing of another tenant."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from kube import NAMESPACE, Kube, Obj, pod_spec
from test_cluster import bound_pv, claim_volume, data_mount, pvc, storage_class

from testing.servers import RcloneS3

NODE_DIR = Path("/var/lib/objfs")  # the node plugin's hostPaths (cache, state): this mount namespace
SIDECAR = "objfs-sidecar"
log = logging.getLogger("e2e")

#: Runs in the sidecar container (as its user, 65534), the secrets to look for read from stdin (so that
#: they are in no cmdline, environment or file of the container); prints one JSON report.
LOOK_AROUND = r"""
import json, os, stat, sys
needles = [n.encode() for n in json.load(sys.stdin)["needles"]]
me = os.getpid()
SKIP = ("/proc", "/sys")
report = {"found_in_files": [], "found_in_environ": [], "found_in_cmdline": [], "found_in_memory": [],
          "unreadable_memory": [], "files_searched": 0, "memory_searched": 0, "inodes": [], "names": [],
          "mountinfo": open("/proc/self/mountinfo").read(), "processes": {}}

def hits(data):
    return [i for i, n in enumerate(needles) if n in data]

# Every path of the container's file system (its own image, its volumes): (st_dev, st_ino) of each,
# for the test to compare with the node's /var/lib/objfs.
for top, dirs, files in os.walk("/", onerror=lambda e: None):
    if top in SKIP:
        dirs[:] = []
        continue
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in SKIP]
    for name in dirs + files:
        path = os.path.join(top, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        report["inodes"].append([st.st_dev, st.st_ino, path])
        if name in ("cache.db", "cache.db-wal", "grants.key", "grants") or name.startswith("objfs-cache"):
            report["names"].append(path)

# The contents of every file a tenant could have been handed: the pod's emptyDir, /tmp, and every
# other file system mounted into the container (not the image's own files, not /proc, /sys, /dev).
roots = {"/objfs-tmp", "/tmp"}
for line in report["mountinfo"].splitlines():
    point = line.split()[4]
    if point != "/" and not point.startswith(("/proc", "/sys", "/dev")):
        roots.add(point)
for root in sorted(roots):
    for top, dirs, files in os.walk(root, onerror=lambda e: None):
        for name in files:
            path = os.path.join(top, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                with open(path, "rb") as f:
                    data = f.read(256 << 20)
            except OSError:
                continue
            report["files_searched"] += 1
            for i in hits(data):
                report["found_in_files"].append([path, i])

# The processes of the container (the sidecar and its per-volume servers), this one aside.
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    if pid == me:
        continue
    proc = f"/proc/{pid}"
    try:
        cmdline = open(f"{proc}/cmdline", "rb").read()
        environ = open(f"{proc}/environ", "rb").read()
    except OSError:
        continue
    for i in hits(cmdline):
        report["found_in_cmdline"].append([pid, i])
    for i in hits(environ):
        report["found_in_environ"].append([pid, i])
    fds = []
    for fd in os.listdir(f"{proc}/fd"):
        try:
            target = os.readlink(f"{proc}/fd/{fd}")
        except OSError:
            continue
        try:
            st = os.stat(f"{proc}/fd/{fd}")
            ident, is_dir = [st.st_dev, st.st_ino], stat.S_ISDIR(st.st_mode)
        except OSError:
            ident, is_dir = None, False
        fds.append({"fd": int(fd), "target": target, "id": ident, "dir": is_dir})
    report["processes"][pid] = {"cmdline": cmdline.replace(b"\0", b" ").decode(errors="replace"), "fds": fds}
    # Their memory: what the sidecar was ever sent (a MountConfig with the Secret was).
    try:
        maps = open(f"{proc}/maps").read().splitlines()
        with open(f"{proc}/mem", "rb", buffering=0) as mem:
            for m in maps:
                fields = m.split()
                if not fields[1].startswith("r") or (len(fields) > 5 and fields[5].startswith("[v")):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                try:
                    mem.seek(start)
                    data = mem.read(end - start)
                except (OSError, OverflowError, ValueError):
                    continue
                report["memory_searched"] += len(data)
                for i in hits(data):
                    report["found_in_memory"].append([pid, i, m])
    except OSError as e:
        report["unreadable_memory"].append([pid, str(e)])
json.dump(report, sys.stdout)
"""


def node_identities() -> tuple[set[tuple[int, int]], list[tuple[str, str]]]:
    """(st_dev, st_ino) of everything under the node's /var/lib/objfs, and the (device, root) of the
    file systems mounted there as /proc/self/mountinfo names them (a bind mount of the node's
    cache into a pod shows that device and a root under them)."""
    ids = set()
    for top, dirs, files in os.walk(NODE_DIR):
        for name in [".", *dirs, *files]:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            ids.add((st.st_dev, st.st_ino))
    sources = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(NODE_DIR) or fields[4].startswith(f"{NODE_DIR}/"):
            sources.append((fields[2], fields[3]))
    assert sources, f"{NODE_DIR} is not a mount of this namespace (e2e/inside.sh binds it)"
    return ids, sources


def node_cache_holds(marker: bytes) -> bool:
    for f in (NODE_DIR / "cache").rglob("*"):
        try:
            if f.is_file() and marker in f.read_bytes():
                return True
        except OSError:
            continue
    return False


def holder(name: str, claim: str, reads: str) -> Obj:
    """A pod that reads /data/``reads`` (checking it is there), marks itself ready and stays up."""
    script = (f"data = open('/data/{reads}', 'rb').read(); assert data, 'empty'\n"
              "open('/tmp/ready', 'w').write('ok')\nimport time; time.sleep(1e9)\n")
    spec = pod_spec(script, [claim_volume(claim)], [data_mount()], readiness="/tmp/ready")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def pod_ready(kube: Kube, name: str) -> bool:
    if not kube.exists("pod", name):
        return False
    pod = kube.get("pod", name)
    if pod.get("status", {}).get("phase") in ("Failed", "Succeeded"):
        raise AssertionError(f"pod {name} ended: {kube.logs(name, 'app')}\n{json.dumps(pod['status'])[:3000]}")
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


ALLOWED_FD_KINDS = ("socket:", "pipe:", "anon_inode:")
ALLOWED_FD_DEVICES = ("/dev/fuse", "/dev/null")


def test_tenant_exec_into_its_sidecar_finds_nothing_of_the_node(kube: Kube, store: RcloneS3) -> None:
    bucket = store.create_bucket("trust-" + secrets.token_hex(4))
    kube.apply(storage_class("objfs-trust", store, bucket))
    kube.apply(pvc("tenant-a", "objfs-trust"), pvc("tenant-b", "objfs-trust"))
    pv_a, pv_b = bound_pv(kube, "tenant-a"), bound_pv(kube, "tenant-b")
    # Each tenant's data, put in the store behind objfs's back; B's carries a marker that A must not find.
    marker = ("tenant-b-only-" + secrets.token_hex(16)).encode()
    store.client().put_object(Bucket=bucket, Key=f"volumes/{pv_a['metadata']['name']}/a.txt", Body=b"A's own\n" * 1000)
    store.client().put_object(Bucket=bucket, Key=f"volumes/{pv_b['metadata']['name']}/b.bin",
                              Body=(marker + b"\n") * 20000)
    # B reads first, so its bytes are in the node cache (the data service fetched them): there is
    # something on the node for A to find, if A could reach it.
    kube.apply(holder("tenant-b", "tenant-b", "b.bin"))
    kube.wait_for("tenant-b ready", lambda: pod_ready(kube, "tenant-b"))
    kube.wait_for("tenant B's data in the node cache", lambda: node_cache_holds(marker))
    kube.apply(holder("tenant-a", "tenant-a", "a.txt"))
    kube.wait_for("tenant-a ready", lambda: pod_ready(kube, "tenant-a"))

    needles = [store.secret_key, store.access_key, marker.decode()]
    what = ["the Secret's secretAccessKey", "the Secret's accessKeyID", "tenant B's data"]
    out = kube.run("-n", NAMESPACE, "exec", "-i", "tenant-a", "-c", SIDECAR, "--", "python3", "-c", LOOK_AROUND,
                   stdin=json.dumps({"needles": needles}), timeout=600)
    report: dict[str, Any] = json.loads(out)
    ids, sources = node_identities()
    log.info("in tenant-a's sidecar: %d paths, %d files read, %d MiB of process memory read; processes: %s",
             len(report["inodes"]), report["files_searched"], report["memory_searched"] >> 20,
             {pid: (p["cmdline"], sorted({fd["target"].split("[")[0] for fd in p["fds"]}))
              for pid, p in report["processes"].items()})

    # The search ran where it should: the sidecar and its server are there, its files were read.
    assert report["processes"], "no process of the sidecar seen"
    assert any("sidecar" in p["cmdline"] for p in report["processes"].values()), report["processes"]
    assert report["files_searched"] > 0
    assert not report["unreadable_memory"], report["unreadable_memory"]
    assert report["memory_searched"] > 0

    # Everything found is reported at once (each kind of leak is a failure of its own).
    problems: list[str] = []
    # 1. Nothing of the node's /var/lib/objfs (cache, state, grant records) in its mount table...
    for line in report["mountinfo"].splitlines():
        dev, root = line.split()[2:4]
        if str(NODE_DIR) in line or any(dev == d and (root + "/").startswith(r + "/") for d, r in sources):
            problems.append(f"the node's {NODE_DIR} is mounted in the sidecar: {line}")
    # ... nor anywhere in its file system (same file = same device and inode), nor a cache by its name.
    reached = [path for dev, ino, path in report["inodes"] if (dev, ino) in ids]
    if reached:
        problems.append(f"the sidecar's file system reaches {len(reached)} files of the node's {NODE_DIR}: "
                        f"{reached[:10]}")
    problems += [f"a node file by its name in the sidecar: {path}" for path in report["names"]]

    # 2. No credential of the StorageClass's Secret and no byte of tenant B in its files, processes'
    # environments, cmdlines or memory.
    for kind in ("files", "environ", "cmdline", "memory"):
        for where, needle, *region in report[f"found_in_{kind}"]:
            problems.append(f"{what[needle]} in the sidecar's {kind}: {where} {' '.join(region)}")

    # 3. Its servers' open fds: their FUSE connection, sockets (the grant connection among them),
    # pipes, anon inodes, and their own files in the pod's emptyDir; no fd of the node.
    for pid, proc in report["processes"].items():
        for fd in proc["fds"]:
            target, desc = fd["target"], f"pid {pid} ({proc['cmdline'][:60]}) fd {fd['fd']} -> {fd['target']}"
            if fd["id"] is not None and tuple(fd["id"]) in ids:
                problems.append(f"{desc}: a file of the node's {NODE_DIR}")
            elif target.startswith(ALLOWED_FD_KINDS) or target in ALLOWED_FD_DEVICES:
                continue
            elif not (target == "/objfs-tmp" or target.startswith("/objfs-tmp/")):
                problems.append(f"{desc}: not the sidecar's own")
            elif fd["dir"] and target != "/objfs-tmp":
                problems.append(f"{desc}: a directory fd")
    assert not problems, "\n".join(dict.fromkeys(problems))  # (a file under two searched roots: once)
    assert any(fd["target"] == "/dev/fuse" for p in report["processes"].values() for fd in p["fds"]), \
        "no server of the sidecar holds /dev/fuse: the check looked at the wrong processes"

    for name in ("tenant-a", "tenant-b"):
        kube.delete("pod", name)
    kube.delete("pvc", "tenant-a")
    kube.delete("pvc", "tenant-b")
