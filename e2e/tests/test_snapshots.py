"""VolumeSnapshots on the real cluster: external-snapshotter's snapshot-controller and the
csi-snapshotter sidecar (built here, e2e/build.sh snapshotter) ask objfs for a snapshot of a PVC;
new PVCs from it (a writable one, filled by copies, and a ReadOnlyMany one, served through the
snapshot's manifest) are read by a pod after the source volume changed and lost files."""

from __future__ import annotations

import hashlib
import json
import secrets

from kube import DRIVER, NAMESPACE, Kube, Obj, pod
from test_cluster import bound_pv, claim_volume, data_mount, pvc, storage_class

from testing.servers import RcloneS3, random_bytes

#: what a pod prints: every file under /data with its sha256
DIGESTS = """
import hashlib, json, os
out = {}
for d, _, files in os.walk('/data'):
    for f in files:
        p = os.path.join(d, f)
        with open(p, 'rb') as fh:
            out[os.path.relpath(p, '/data')] = hashlib.sha256(fh.read()).hexdigest()
print(json.dumps(out, sort_keys=True))
"""


def snapshot_class(name: str) -> Obj:
    return {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass", "metadata": {"name": name},
            "driver": DRIVER, "deletionPolicy": "Delete",
            "parameters": {"csi.storage.k8s.io/snapshotter-secret-name": "objfs-s3",
                           "csi.storage.k8s.io/snapshotter-secret-namespace": "objfs"}}


def restored(name: str, sc: str, snapshot: str, mode: str) -> Obj:
    claim = pvc(name, sc, mode)
    claim["spec"]["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot}
    return claim


def digests(kube: Kube, name: str, claim: str, read_only: bool) -> dict[str, str]:
    kube.apply(pod(name, DIGESTS, [claim_volume(claim, read_only)], [data_mount(read_only)]))
    kube.wait_pod_done(name)
    out: dict[str, str] = json.loads(kube.logs(name, "app").strip().splitlines()[-1])
    kube.delete("pod", name)
    # a provisioned volume's marker (objfs's own, at the top of its prefix) shows in its mount; a
    # read-only volume of a snapshot has its marker in the snapshot's folder instead
    out.pop(".objfs-volume.json", None)
    return out


def test_a_pod_reads_snapshot_time_data_from_a_claim_made_of_a_snapshot(kube: Kube, store: RcloneS3) -> None:
    bucket = store.create_bucket("e2e-snap-" + secrets.token_hex(4))
    kube.apply(storage_class("objfs-e2e-snap", store, bucket), snapshot_class("objfs-e2e-snapshots"))
    kube.apply(pvc("source", "objfs-e2e-snap"))
    prefix = f"volumes/{bound_pv(kube, 'source')['metadata']['name']}/"
    client = store.client()
    then = {"a.txt": b"alpha at snapshot time", "data/b.bin": random_bytes(2_000_000, 7), "data/gone": b"deleted later"}
    for k, v in then.items():
        client.put_object(Bucket=bucket, Key=prefix + k, Body=v)

    kube.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": "snap", "namespace": NAMESPACE},
                "spec": {"volumeSnapshotClassName": "objfs-e2e-snapshots",
                         "source": {"persistentVolumeClaimName": "source"}}})
    status = kube.wait_for("snapshot ready", lambda: (st := kube.get("volumesnapshot", "snap").get("status", {}))
                           .get("readyToUse") and st)
    assert status["restoreSize"] == str(sum(map(len, then.values())))
    content = kube.get("volumesnapshotcontent", status["boundVolumeSnapshotContentName"], None)
    assert content["status"]["snapshotHandle"].startswith("objfs1s:s3:" + bucket + ":")

    # The source changes after the snapshot: rewritten, deleted and new files.
    client.put_object(Bucket=bucket, Key=prefix + "a.txt", Body=b"changed after the snapshot")
    client.delete_object(Bucket=bucket, Key=prefix + "data/gone")
    client.put_object(Bucket=bucket, Key=prefix + "new.txt", Body=b"new")
    want = {k: hashlib.sha256(v).hexdigest() for k, v in then.items()}

    # A writable claim (server-side copies) and a ReadOnlyMany one (the snapshot itself).
    kube.apply(restored("writable", "objfs-e2e-snap", "snap", "ReadWriteMany"),
               restored("readonly", "objfs-e2e-snap", "snap", "ReadOnlyMany"))
    ro_pv = bound_pv(kube, "readonly")
    assert ro_pv["spec"]["csi"]["volumeHandle"].startswith("objfs1:s:s3:" + bucket + ":")
    bound_pv(kube, "writable")
    assert digests(kube, "read-writable", "writable", False) == want
    assert digests(kube, "read-readonly", "readonly", True) == want
    # the source has today's data
    now = digests(kube, "read-source", "source", False)
    assert now["a.txt"] == hashlib.sha256(b"changed after the snapshot").hexdigest() and "data/gone" not in now

    # Teardown in the order the API allows: claims of the snapshot, then the snapshot (its data goes).
    for claim in ("writable", "readonly", "source"):
        kube.delete("pvc", claim)
    kube.delete("volumesnapshot", "snap")
    kube.wait_for("snapshot data deleted", lambda: not client.list_objects_v2(
        Bucket=bucket, Prefix=".objfs-snapshots/").get("Contents"))
