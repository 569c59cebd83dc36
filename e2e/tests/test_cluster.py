"""objfs on a real Kubernetes (e2e/run.sh): the real kubelet publishes the volumes, the real
external-provisioner creates them, the webhook adds the sidecars, and the pods read and write through
their FUSE mounts to an rclone S3 server on the first node's address. These tests look at the node's
mounts and the node plugin's records, so their pods run on the first node (kube.FIRST_NODE)."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kube import DRIVER, NAMESPACE, Kube, Obj, pod, pod_spec
from safetensors.numpy import save

from testing.proxy import CountingProxy
from testing.servers import RcloneS3, random_bytes

log = logging.getLogger("e2e")
STATE = Path("/var/lib/objfs/state/targets")  # the node plugin's records (hostPath, this mount ns)


def storage_class(name: str, s3: RcloneS3, bucket: str) -> Obj:
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
            "provisioner": DRIVER, "reclaimPolicy": "Delete",
            "parameters": {"bucket": bucket, "prefix": "volumes", "endpoint": s3.endpoint, "region": "us-east-1",
                           "csi.storage.k8s.io/provisioner-secret-name": "objfs-s3",
                           "csi.storage.k8s.io/provisioner-secret-namespace": "objfs",
                           "csi.storage.k8s.io/node-publish-secret-name": "objfs-s3",
                           "csi.storage.k8s.io/node-publish-secret-namespace": "objfs"}}


def pvc(name: str, sc: str, mode: str = "ReadWriteMany") -> Obj:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"accessModes": [mode], "storageClassName": sc, "resources": {"requests": {"storage": "1Gi"}}}}


def claim_volume(claim: str, read_only: bool = False) -> Obj:
    return {"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def data_mount(read_only: bool = False) -> Obj:
    return {"name": "data", "mountPath": "/data", "readOnly": read_only}


def objfs_mounts() -> list[str]:
    """FUSE mounts of objfs under the kubelet's pods (this test runs in the cluster's mount namespace)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1].startswith("fuse") and fields[4].startswith("/var/lib/kubelet/"):
            out.append(fields[4])
    return out


def sidecars_of(pod_uid: str) -> list[int]:
    """`objfs sidecar` processes of one pod: those with that pod's volumes (their kubelet paths name the
    pod UID) in their mount table (the pod has a network namespace of its own: the UID is the key)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            if (b"sidecar" in cmd and any(b"objfs" in c for c in cmd)
                    and pod_uid in (p / "mountinfo").read_text()):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def records_for(pod_uid: str) -> list[dict[str, Any]]:
    recs = []
    for f in STATE.glob("*.json") if STATE.is_dir() else []:
        rec = json.loads(f.read_text())
        if pod_uid in rec.get("target", ""):
            recs.append(rec)
    return recs


def bound_pv(kube: Kube, claim: str) -> Obj:
    kube.wait_for(f"pvc {claim} bound", lambda: kube.get("pvc", claim).get("status", {}).get("phase") == "Bound")
    return kube.get("pv", kube.get("pvc", claim)["spec"]["volumeName"], None)


@pytest.fixture(scope="module")
def sc(kube: Kube, store: RcloneS3) -> tuple[str, str]:
    bucket = store.create_bucket("e2e-" + secrets.token_hex(4))
    name = "objfs-e2e"
    kube.apply(storage_class(name, store, bucket))
    return name, bucket


WRITE_READ = """
import hashlib, os, sys
data = os.urandom(3 * 1024 * 1024 + 17)
with open('/data/out.bin', 'wb') as f:
    f.write(data)
with open('/data/out.bin', 'rb') as f:
    back = f.read()
assert back == data, 'read back differs'
with open('/data/small.txt', 'w') as f:  # closed here: a failed upload fails the pod
    f.write('hello from a pod\\n')
print(hashlib.sha256(data).hexdigest())
"""


def test_provisioned_claim_is_written_and_read_by_a_pod(kube: Kube, store: RcloneS3, sc: tuple[str, str]) -> None:
    name, bucket = sc
    kube.apply(pvc("rw", name))
    pv = bound_pv(kube, "rw")
    assert pv["spec"]["csi"]["driver"] == DRIVER
    kube.apply(pod("writer", WRITE_READ, [claim_volume("rw")], [data_mount()]))
    done = kube.wait_pod_done("writer")
    # the webhook gave the pod its sidecar
    names = [c["name"] for c in done["spec"].get("initContainers", []) + done["spec"]["containers"]]
    assert "objfs-sidecar" in names
    digest = kube.logs("writer", "app").split()[-1]
    prefix = f"volumes/{pv['metadata']['name']}/"
    assert hashlib.sha256(store.read_object(bucket, prefix + "out.bin")).hexdigest() == digest
    assert store.read_object(bucket, prefix + "small.txt") == b"hello from a pod\n"
    # deleting the pod leaves no mount, FUSE server or record of it
    uid = done["metadata"]["uid"]
    kube.delete("pod", "writer")
    kube.wait_for("writer's mounts gone", lambda: not [m for m in objfs_mounts() if uid in m])
    assert not records_for(uid)
    assert not sidecars_of(uid)


def test_deleting_the_claim_deletes_its_data(kube: Kube, store: RcloneS3, sc: tuple[str, str]) -> None:
    name, bucket = sc
    kube.apply(pvc("doomed", name))
    pv = bound_pv(kube, "doomed")
    kube.apply(pod("fill", "open('/data/a.txt', 'w').write('x' * 1000)", [claim_volume("doomed")], [data_mount()]))
    kube.wait_pod_done("fill")
    prefix = f"volumes/{pv['metadata']['name']}/"
    assert store.read_object(bucket, prefix + "a.txt") == b"x" * 1000
    kube.delete("pod", "fill")
    kube.delete("pvc", "doomed")
    kube.wait_for("pv deleted", lambda: not kube.exists("pv", pv["metadata"]["name"], None))
    left = store.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    assert left == []


def static_pv(name: str, s3: RcloneS3, bucket: str, prefix: str, endpoint: str = "") -> list[Obj]:
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                  "csi": {"driver": DRIVER, "volumeHandle": name, "readOnly": True,
                          "volumeAttributes": {"bucket": bucket, "prefix": prefix, "endpoint": endpoint or s3.endpoint,
                                               "region": "us-east-1"},
                          "nodePublishSecretRef": {"name": "objfs-s3", "namespace": "objfs"}}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NAMESPACE},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": name,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]


def upload_model(s3: RcloneS3, bucket: str, prefix: str) -> tuple[dict[str, str], int]:
    """A small safetensors model (written with the safetensors library; 20 MiB: three 8 MiB blocks) and
    a config, uploaded; returns the sha256 of each tensor's bytes, which the pods check after parsing
    the file themselves, and the bytes uploaded."""
    tensors = {f"layer{i}.weight": np.frombuffer(random_bytes(4 * (1280 * 1024 + 1031 * i), seed=i),
                                                 dtype=np.float32).reshape(-1, 1) for i in range(4)}
    model, config = save(tensors), b'{"layers": 4}'
    s3.client().put_object(Bucket=bucket, Key=prefix + "model.safetensors", Body=model)
    s3.client().put_object(Bucket=bucket, Key=prefix + "config.json", Body=config)
    return {name: hashlib.sha256(t.tobytes()).hexdigest() for name, t in tensors.items()}, len(model) + len(config)


def check_model(manifest: dict[str, str], ready_file: str, loop: bool = False) -> str:
    """A pod's script: load /data/model.safetensors (header and every tensor, by the format: the image
    has no safetensors library) and check each tensor's sha256; mark ready; with ``loop``, keep loading
    (counting rounds in /tmp/rounds) and exit non-zero at the first failed read."""
    return f"""
import hashlib, json, struct, sys, time
manifest = json.loads({json.dumps(json.dumps(manifest))})
def check():
    with open('/data/model.safetensors', 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
        header.pop('__metadata__', None)
        if sorted(header) != sorted(manifest):
            sys.exit(f'tensors {{sorted(header)}} != {{sorted(manifest)}}')
        for name, t in header.items():
            start, end = t['data_offsets']
            f.seek(8 + n + start)
            got = hashlib.sha256(f.read(end - start)).hexdigest()
            if got != manifest[name]:
                sys.exit(f'{{name}}: sha256 {{got}} != {{manifest[name]}}')
    json.load(open('/data/config.json'))
check()
open({ready_file!r}, 'w').write('ok')
rounds = 0
while {loop!r}:
    try:
        check()
    except Exception as e:
        print('read failed:', repr(e), flush=True)
        sys.exit(3)
    rounds += 1
    open('/tmp/rounds', 'w').write(str(rounds))
    time.sleep(0.2)
time.sleep(1e9)
"""


def deployment(name: str, replicas: int, script: str, claim: str) -> Obj:
    spec = pod_spec(script, [claim_volume(claim, read_only=True)], [data_mount(read_only=True)],
                    restart="Always", readiness="/tmp/ready")
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


def ready_replicas(kube: Kube, name: str) -> int:
    return int(kube.get("deployment", name).get("status", {}).get("readyReplicas") or 0)


def serve_model(kube: Kube, store: RcloneS3, name: str, replicas: int, endpoint: str = "", loop: bool = False,
                spread: bool = False) -> tuple[list[Obj], int]:
    """A model uploaded to a new bucket, a ReadOnlyMany PV of it (``model-<name>``, through ``endpoint``)
    and a Deployment ``name`` whose replicas check it (``check_model``), on the first node or, with
    ``spread``, spread evenly over the nodes; returns its pods once all are ready, and the model's size."""
    bucket = store.create_bucket(name + "-" + secrets.token_hex(4))
    manifest, size = upload_model(store, bucket, "m/")
    kube.apply(*static_pv(f"model-{name}", store, bucket, "m", endpoint=endpoint))
    d = deployment(name, replicas, check_model(manifest, "/tmp/ready", loop=loop), f"model-{name}")
    if spread:
        spec = d["spec"]["template"]["spec"]
        spec.pop("nodeSelector", None)
        spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                              "whenUnsatisfiable": "DoNotSchedule",
                                              # a cordoned node is no place to spread to
                                              "nodeTaintsPolicy": "Honor",
                                              "labelSelector": {"matchLabels": {"app": name}}}]
    kube.apply(d)
    kube.wait_for(f"{replicas} replicas of {name} ready", lambda: ready_replicas(kube, name) == replicas)
    return kube.get("pod", selector=f"app={name}")["items"], size


def test_read_only_many_volume_serves_three_replicas(kube: Kube, store: RcloneS3, counted: CountingProxy) -> None:
    pods, size = serve_model(kube, store, "inference", 3, endpoint=counted.endpoint)
    assert len(pods) == 3
    assert all(s["restartCount"] == 0 for p in pods for s in p["status"]["containerStatuses"])
    # Three sidecars, one node cache: the model's bytes came from the store about once (each block
    # once per node; the first read of each server may add a small ranged GET of its header), where
    # three servers fetching for themselves would have read 3x.
    tally = counted.tally()
    assert size <= tally.body_bytes["GET"] < 1.5 * size, tally.as_dict()
    assert all(sidecars_of(p["metadata"]["uid"]) for p in pods)  # found while they run, gone after
    kube.delete("deployment", "inference")
    kube.wait_for("inference pods gone", lambda: not kube.get("pod", selector="app=inference")["items"])
    for p in pods:
        uid = p["metadata"]["uid"]
        assert not [m for m in objfs_mounts() if uid in m]
        assert not records_for(uid)
        assert not sidecars_of(uid)


def test_inline_ephemeral_volume(kube: Kube, store: RcloneS3) -> None:
    bucket = store.create_bucket("inline-" + secrets.token_hex(4))
    store.client().put_object(Bucket=bucket, Key="assets/logo.txt", Body=b"inline volume\n")
    volume = {"name": "data", "csi": {"driver": DRIVER, "readOnly": True,
                                      "volumeAttributes": {"bucket": bucket, "prefix": "assets",
                                                           "endpoint": store.endpoint, "region": "us-east-1"},
                                      "nodePublishSecretRef": {"name": "objfs-s3"}}}
    script = "assert open('/data/logo.txt').read() == 'inline volume\\n', 'wrong content'; print('ok')"
    kube.apply(pod("inline", script, [volume], [data_mount(read_only=True)]))
    kube.wait_pod_done("inline")
    assert kube.logs("inline", "app").strip().endswith("ok")
    kube.delete("pod", "inline")


def test_job_completes_with_its_sidecar(kube: Kube, store: RcloneS3, sc: tuple[str, str]) -> None:
    name, bucket = sc
    kube.apply(pvc("results", name))
    pv = bound_pv(kube, "results")
    spec = pod_spec("open('/data/score.txt', 'w').write('0.93\\n')", [claim_volume("results")], [data_mount()])
    kube.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "evaluate", "namespace": NAMESPACE},
                "spec": {"backoffLimit": 0, "template": {"spec": spec}}})
    kube.wait_for("job complete", lambda: any(
        c["type"] in ("Complete", "Failed") and c["status"] == "True"
        for c in kube.get("job", "evaluate").get("status", {}).get("conditions", [])))
    conditions = {c["type"]: c["status"] for c in kube.get("job", "evaluate")["status"]["conditions"]}
    assert conditions.get("Complete") == "True", conditions
    assert store.read_object(bucket, f"volumes/{pv['metadata']['name']}/score.txt") == b"0.93\n"
    kube.run("-n", NAMESPACE, "delete", "job", "evaluate", "--cascade=foreground", "--wait=true")


SLOW_WRITER = """
import hashlib, os, sys, time
MiB = 1 << 20
h, size = hashlib.sha256(), 0
def put(f, n):
    global size
    chunk = os.urandom(n)
    f.write(chunk)
    h.update(chunk)
    size += n
    open('/tmp/written.tmp', 'w').write(str(size))
    os.replace('/tmp/written.tmp', '/tmp/written')  # whole when the test reads it
with open('/data/slow.bin', 'wb') as f:
    # More than one multipart part (8 MiB) before the restart, so an upload is in flight across it;
    # then slowly, 64 KiB at a time, until the test says the new plugin is serving; then a few more
    # parts' worth, so that parts are uploaded through the new data service too.
    while size < 9 * MiB:
        put(f, MiB)
    while not os.path.exists('/tmp/finish'):
        put(f, 64 * 1024)
        time.sleep(0.1)
    target = size + 9 * MiB + 12345
    while size < target:
        put(f, min(MiB, target - size))
# closed: the upload completed, or close failed and so does this pod
print(size, h.hexdigest(), flush=True)
"""


def test_node_plugin_rollout_breaks_no_read_and_no_write(kube: Kube, store: RcloneS3, sc: tuple[str, str]) -> None:
    """`kubectl rollout restart` of the node DaemonSet while one pod reads a model in a loop and another
    writes a file slowly: the restarted plugin hands both sidecars new grant connections, no read
    fails, and the file is whole in the store."""
    bucket = store.create_bucket("roll-" + secrets.token_hex(4))
    manifest, _ = upload_model(store, bucket, "m/")
    kube.apply(*static_pv("model-roll", store, bucket, "m"))
    kube.apply(deployment("reader", 1, check_model(manifest, "/tmp/ready", loop=True), "model-roll"))
    sc_name, sc_bucket = sc
    kube.apply(pvc("slow", sc_name))
    pv = bound_pv(kube, "slow")
    kube.apply(pod("slow-writer", SLOW_WRITER, [claim_volume("slow")], [data_mount()]))
    kube.wait_for("reader ready", lambda: ready_replicas(kube, "reader") == 1)
    (p,) = kube.get("pod", selector="app=reader")["items"]
    name = p["metadata"]["name"]

    def counter(pod_name: str, path: str) -> int:
        out = kube.exec(pod_name, "cat", path, container="app", check=False).strip()
        return int(out) if out.isdigit() else 0

    # the writer has a multipart upload going (its first part sent or in flight) before the restart
    kube.wait_for("writer past its first part", lambda: counter("slow-writer", "/tmp/written") >= 9 << 20)
    before = counter(name, "/tmp/rounds")
    old = {q["metadata"]["uid"] for q in kube.get("pod", "", "objfs", selector="app=objfs-csi-node")["items"]}
    kube.run("-n", "objfs", "rollout", "restart", "ds/objfs-csi-node")
    kube.run("-n", "objfs", "rollout", "status", "ds/objfs-csi-node", "--timeout=600s", timeout=660)
    new = {q["metadata"]["uid"] for q in kube.get("pod", "", "objfs", selector="app=objfs-csi-node")["items"]}
    assert new and not new & old, "the node plugin was not replaced"
    # reads went on through the restart and go on after it
    after = kube.wait_for("reads after the rollout", lambda: (r := counter(name, "/tmp/rounds")) > before + 5 and r)
    assert after > before
    status = kube.get("pod", name)["status"]["containerStatuses"]
    assert all(s["restartCount"] == 0 for s in status), kube.logs(name, "app")
    # the writer wrote all along; now it finishes (more parts, through the new data service) and closes
    written = counter("slow-writer", "/tmp/written")
    kube.exec("slow-writer", "touch", "/tmp/finish", container="app")
    kube.wait_pod_done("slow-writer")
    size, digest = kube.logs("slow-writer", "app").split()[-2:]
    log.info("rollout: reader rounds %d before, %d after; writer had written %d MiB when told to finish "
             "(after the rollout), %.1f MiB in all", before, after, written >> 20, int(size) / (1 << 20))
    for pod_name in (name, "slow-writer"):
        sidecar_log = kube.logs(pod_name, "objfs-sidecar")
        log.info("%s's sidecar:\n%s", pod_name, sidecar_log[-3000:])
        # the restart did cut this sidecar's grant connection (fusefs.wire.grant says so): what went on
        # afterwards went through the connection the new plugin handed it
        assert "the data service went away" in sidecar_log, pod_name
    try:  # what a restart leaves on the store besides the file (informative: the store expires these)
        left = store.client().list_multipart_uploads(Bucket=sc_bucket).get("Uploads", [])
        log.info("multipart uploads left in the volume's bucket: %d", len(left))
    except Exception as exc:  # not every S3 server lists them
        log.info("multipart uploads not listed: %s", exc)
    assert int(size) > written
    data = store.read_object(sc_bucket, f"volumes/{pv['metadata']['name']}/slow.bin")
    assert len(data) == int(size)
    assert hashlib.sha256(data).hexdigest() == digest
    kube.delete("deployment", "reader")
    kube.delete("pod", "slow-writer")
