"""Fixtures of the e2e tests: the cluster e2e/run.sh started (its kubeconfig in E2E_KUBECONFIG), an
rclone S3 server on the first node's address, the namespace the workloads run in and the store's Secret."""

from __future__ import annotations

import base64
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from kube import NAMESPACE, Kube  # noqa: E402

from testing.proxy import CountingProxy  # noqa: E402
from testing.servers import RcloneS3  # noqa: E402


@pytest.fixture(scope="session")
def kube() -> Kube:
    kubeconfig = os.environ.get("E2E_KUBECONFIG")
    if not kubeconfig:
        pytest.skip("no cluster: run these through `make e2e` (e2e/run.sh sets E2E_KUBECONFIG)")
    k = Kube(kubeconfig)
    # failurePolicy Ignore admits pods without the sidecar until the webhook has published its CA:
    # wait for it, or the first pods would fail for a reason that is not the one under test.
    k.wait_for("webhook caBundle", lambda: k.get("mutatingwebhookconfiguration", "objfs-webhook", None)
               ["webhooks"][0]["clientConfig"].get("caBundle"))
    return k


#: the S3 server's port: fixed, because the node plugin allows inline volumes only this endpoint
#: (--inline-endpoints in e2e/overlay/kustomization.yaml); the cluster has a network namespace of its
#: own, so nothing else holds it
S3_PORT = 19000


def node_ip() -> str:
    """The first node's address, where the store listens: the node plugins (on their nodes' networks)
    and the pods (on the pod network) of every node reach it; 127.0.0.1 would be their own."""
    return os.environ.get("E2E_NODE_IP", "10.213.0.1")


@pytest.fixture(scope="session")
def s3() -> Iterator[RcloneS3]:
    with (tempfile.TemporaryDirectory(prefix="objfs-e2e-s3-") as d,
          RcloneS3(Path(d) / "data", port=S3_PORT, host=node_ip()) as server):
        yield server


@pytest.fixture(scope="session")
def store(kube: Kube, s3: RcloneS3) -> RcloneS3:
    """The namespace e2e and the Secret objfs-s3 (in objfs for the StorageClass and PVs, in e2e for
    inline volumes, which take the Secret from the pod's namespace)."""
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    data = {"accessKeyID": s3.access_key, "secretAccessKey": s3.secret_key}
    for ns in ("objfs", NAMESPACE):
        kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": "objfs-s3", "namespace": ns},
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    return s3


@pytest.fixture()
def counted(s3: RcloneS3) -> Iterator[CountingProxy]:
    """A counting proxy in front of the store, for volumes whose requests a test counts (its
    endpoint, on the node's address, goes into their volume attributes)."""
    with CountingProxy(s3.port, upstream_host=s3.host, host=s3.host) as proxy:
        yield proxy
