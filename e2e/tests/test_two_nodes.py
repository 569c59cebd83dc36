"""objfs across the cluster's two nodes (e2e/inside.sh starts the second in its own network and mount
namespace): a ReadWriteMany volume written on one node and read on the other, a ReadOnlyMany model
spread over both (each node's cache fetches it once), and a node drained while the other serves."""

from __future__ import annotations

import hashlib
import logging
import secrets

import pytest
from kube import NODES, Kube, pod
from test_cluster import bound_pv, claim_volume, data_mount, pvc, ready_replicas, serve_model, storage_class

from testing.proxy import CountingProxy
from testing.servers import RcloneS3

log = logging.getLogger("e2e")
pytestmark = pytest.mark.skipif(len(NODES) < 2, reason="needs the cluster's second node (E2E_NODES=2)")

WRITE = """
import hashlib, os
data = os.urandom(5 * 1024 * 1024 + 99)
with open('/data/shared.bin', 'wb') as f:
    f.write(data)
print(hashlib.sha256(data).hexdigest())
"""

READ = """
import hashlib
print(hashlib.sha256(open('/data/shared.bin', 'rb').read()).hexdigest())
"""


@pytest.fixture(scope="module")
def sc(kube: Kube, store: RcloneS3) -> tuple[str, str]:
    bucket = store.create_bucket("two-" + secrets.token_hex(4))
    kube.apply(storage_class("objfs-e2e-two", store, bucket))
    return "objfs-e2e-two", bucket


def node_of(kube: Kube, name: str) -> str:
    return str(kube.get("pod", name)["spec"].get("nodeName", ""))


def test_read_write_many_volume_written_on_one_node_is_read_on_the_other(
        kube: Kube, store: RcloneS3, sc: tuple[str, str]) -> None:
    name, bucket = sc
    kube.apply(pvc("across", name))
    pv = bound_pv(kube, "across")
    kube.apply(pod("write-a", WRITE, [claim_volume("across")], [data_mount()], node=NODES[0]))
    kube.wait_pod_done("write-a")
    written = kube.logs("write-a", "app").split()[-1]
    kube.apply(pod("read-b", READ, [claim_volume("across")], [data_mount()], node=NODES[1]))
    kube.wait_pod_done("read-b")
    assert (node_of(kube, "write-a"), node_of(kube, "read-b")) == (NODES[0], NODES[1])
    assert kube.logs("read-b", "app").split()[-1] == written
    data = store.read_object(bucket, f"volumes/{pv['metadata']['name']}/shared.bin")
    assert hashlib.sha256(data).hexdigest() == written
    for p in ("write-a", "read-b"):
        kube.delete("pod", p)
    kube.delete("pvc", "across")


def test_read_only_model_spread_over_two_nodes_is_fetched_once_per_node(
        kube: Kube, store: RcloneS3, counted: CountingProxy) -> None:
    pods, size = serve_model(kube, store, "spread", 4, endpoint=counted.endpoint, spread=True)
    per_node = {n: sum(p["spec"]["nodeName"] == n for p in pods) for n in NODES[:2]}
    assert per_node == {NODES[0]: 2, NODES[1]: 2}, per_node
    # Four sidecars, two node caches: every replica read the whole model, and each node's cache
    # fetched it about once (a first read may add a small ranged GET of the header): 2x, where four
    # servers fetching for themselves would have read 4x and one shared cache 1x.
    tally = counted.tally()
    log.info("spread over two nodes: %d model bytes, %d GET bytes from the store", size, tally.body_bytes["GET"])
    assert 2 * size <= tally.body_bytes["GET"] < 2.5 * size, tally.as_dict()
    kube.delete("deployment", "spread")
    kube.wait_for("spread pods gone", lambda: not kube.get("pod", selector="app=spread")["items"])
    kube.delete("pvc", "model-spread")
    kube.run("delete", "pv", "model-spread", "--wait=true")


def test_draining_one_node_leaves_the_other_serving(kube: Kube, store: RcloneS3) -> None:
    """Two readers of a model, one per node, each checking every tensor in a loop (the first failed
    read fails its pod); the second node is drained of them: its reader is evicted and comes back on
    the first node, and the reader that was there never fails, restarts or stops reading. The drain
    selects the readers: objfs's controller and webhook run one replica each here, and moving the
    webhook while the evicted reader is re-created would admit it without its sidecar
    (failurePolicy Ignore), a race of this small cluster, not of objfs."""
    started, _ = serve_model(kube, store, "drain", 2, loop=True, spread=True)
    pods = {p["spec"]["nodeName"]: p["metadata"]["name"] for p in started}
    assert sorted(pods) == sorted(NODES[:2]), pods
    stay = pods[NODES[0]]

    def rounds() -> int:
        out = kube.exec(stay, "cat", "/tmp/rounds", container="app", check=False).strip()
        return int(out) if out.isdigit() else 0

    before = rounds()
    try:
        # --delete-emptydir-data: the sidecar's scratch emptyDir (objfs-tmp) goes with the evicted pod
        kube.run("drain", NODES[1], "--pod-selector=app=drain", "--ignore-daemonsets", "--delete-emptydir-data",
                 "--timeout=300s", timeout=360)
        kube.wait_for("2 replicas ready again", lambda: ready_replicas(kube, "drain") == 2)
        now = kube.get("pod", selector="app=drain")["items"]
        assert {p["spec"]["nodeName"] for p in now} == {NODES[0]}, [p["spec"]["nodeName"] for p in now]
        after = kube.wait_for("reads go on", lambda: (r := rounds()) > before + 5 and r)
        status = kube.get("pod", stay)["status"]["containerStatuses"]
        assert all(s["restartCount"] == 0 for s in status), kube.logs(stay, "app")
        log.info("drain: the staying reader's rounds %d before, %d after", before, after)
    finally:
        kube.run("uncordon", NODES[1])
    kube.delete("deployment", "drain")
    kube.wait_for("drain pods gone", lambda: not kube.get("pod", selector="app=drain")["items"])
    kube.delete("pvc", "model-drain")
    kube.run("delete", "pv", "model-drain", "--wait=true")
