"""The admission webhook, run as ``objfs-csi --mode webhook`` processes and served over TLS on loopback,
answering real AdmissionReview v1 requests; each JSONPatch it returns is applied (jsonpatch) and the
resulting pod checked.

The Kubernetes API server is the only thing mocked (testing/kubemock.py: /version, the webhook's own
pod, its certificate Secret, the MutatingWebhookConfiguration's caBundle, PVCs/PVs/StorageClasses):
it cannot run in these tests.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from csi.webhook import inject as I
from testing.kubemock import FakeApiServer

IMAGE = "registry.example/objfs-csi:9.9.9"
NS = "objfs"
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/objfs-webhook"
SECRET = f"/api/v1/namespaces/{NS}/secrets/objfs-webhook-tls"
SERVICE_NAME = f"objfs-webhook.{NS}.svc"


def fake_cluster(workdir: Path, minor: str) -> FakeApiServer:
    api = FakeApiServer(workdir, version=("1", minor))
    api.put(f"/api/v1/namespaces/{NS}/pods/objfs-webhook-0", {"kind": "Pod", "spec": {"containers": [
        {"name": "objfs-webhook", "image": IMAGE, "imagePullPolicy": "IfNotPresent"}]}})
    api.put(SECRET, {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "objfs-webhook-tls"}, "type": "Opaque"})
    api.put(MWC, {"kind": "MutatingWebhookConfiguration", "webhooks": [
        {"name": "sidecar.objfs.csi.dev", "clientConfig": {"service": {"name": "objfs-webhook", "namespace": NS}}}]})
    sc = "/apis/storage.k8s.io/v1/storageclasses"
    api.put(f"{sc}/objfs-prefix", {"provisioner": "objfs.csi.dev"})
    api.put(f"{sc}/standard", {"provisioner": "pd.csi.storage.gke.io"})
    api.put("/api/v1/persistentvolumes/pv-models", {"spec": {"csi": {"driver": "objfs.csi.dev"}}})
    api.put("/api/v1/persistentvolumes/pv-disk", {"spec": {"csi": {"driver": "pd.csi.storage.gke.io"}}})
    claims = "/api/v1/namespaces/team/persistentvolumeclaims"
    api.put(f"{claims}/models", {"spec": {"volumeName": "pv-models", "storageClassName": ""}})
    api.put(f"{claims}/pending", {"spec": {"storageClassName": "objfs-prefix"}})
    api.put(f"{claims}/disk", {"spec": {"volumeName": "pv-disk"}})
    api.put(f"{claims}/other", {"spec": {"storageClassName": "standard"}})
    # Claims not yet bound whose class does not exist, each with a PV made for it in advance (claimRef),
    # as the storage e2e suite's static provisioning does: the PV's driver tells.
    api.put(f"{claims}/prebound", {"spec": {"storageClassName": "no-such-class"}})
    api.put("/api/v1/persistentvolumes/pv-prebound", {"spec": {"csi": {"driver": "objfs.csi.dev"},
                                                               "claimRef": {"namespace": "team", "name": "prebound"}}})
    api.put(f"{claims}/prebound-disk", {"spec": {"storageClassName": "no-such-class"}})
    ref = {"namespace": "team", "name": "prebound-disk"}
    api.put("/api/v1/persistentvolumes/pv-prebound-disk",
            {"spec": {"csi": {"driver": "pd.csi.storage.gke.io"}, "claimRef": ref}})
    return api


@dataclass
class WebhookProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ca_pem: bytes
    workdir: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def post(self, body: bytes, path: str = "/mutate") -> tuple[int, bytes]:
        """Over TLS, verifying the server as the API server does: against the caBundle, by Service name."""
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        conn.sock = ctx.wrap_socket(raw, server_hostname=SERVICE_NAME)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def review(self, obj: Any, operation: str = "CREATE", kind: str = "Pod", namespace: str = "team"
               ) -> dict[str, Any]:
        uid = str(uuid.uuid4())
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": kind.lower() + "s"},
            "namespace": namespace, "operation": operation, "object": obj, "dryRun": False,
            "userInfo": {"username": "tester"}}}
        status, body = self.post(json.dumps(review).encode())
        assert status == 200, body
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == uid
        return answer["response"]  # type: ignore[no-any-return]

    def mutate(self, pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the pod after the webhook's patch, the response)."""
        response = self.review(pod)
        assert response["allowed"] is True, response
        if "patch" not in response:
            return pod, response
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
        return jsonpatch.apply_patch(pod, patch), response

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def start_webhook(api: FakeApiServer, workdir: Path, *extra: str) -> WebhookProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "webhook.log"
    argv = [sys.executable, "-c", "import sys; from csi.main import main; sys.exit(main())", "--mode", "webhook",
            "--webhook-address", "127.0.0.1:0", "--kube-api", api.url, "--kube-token-file", str(api.token_file),
            "--kube-ca-file", str(api.ca_file), "--cert-dir", str(workdir / "tls"), "--log-level", "DEBUG", *extra]
    env = {**os.environ, "POD_NAME": "objfs-webhook-0", "POD_NAMESPACE": NS}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        found = re.search(r"serving https://127\.0\.0\.1:(\d+)/mutate", log_path.read_text())
        if found:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the webhook did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    ca = base64.b64decode(api.get(MWC)["webhooks"][0]["clientConfig"]["caBundle"])
    return WebhookProcess(proc, int(found.group(1)), log_path, ca, workdir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApiServer]:
    with fake_cluster(tmp_path_factory.mktemp("api"), "30+") as api:
        yield api


@pytest.fixture(scope="module")
def native(cluster: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookProcess]:
    hook = start_webhook(cluster, tmp_path_factory.mktemp("webhook-native"))
    yield hook
    hook.stop()


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookProcess]:
    """A webhook in front of a 1.28 API server: the sidecar is a regular container."""
    with fake_cluster(tmp_path_factory.mktemp("api-128"), "28") as api:
        hook = start_webhook(api, tmp_path_factory.mktemp("webhook-legacy"), "--native-sidecars", "auto")
        yield hook
        hook.stop()


def pod(annotations: dict[str, str] | None = None, volumes: list[dict[str, Any]] | None = None,
        init: list[dict[str, Any]] | None = None, containers: list[str] = ("app",)) -> dict[str, Any]:  # type: ignore[assignment]
    spec: dict[str, Any] = {"containers": [{"name": c, "image": "busybox"} for c in containers]}
    if volumes is not None:
        spec["volumes"] = volumes
    if init is not None:
        spec["initContainers"] = init
    meta: dict[str, Any] = {"generateName": "job-", "namespace": "team"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


INJECT = {I.INJECT_ANNOTATION: "true"}
INLINE = {"name": "data", "csi": {"driver": "objfs.csi.dev", "volumeAttributes": {"bucket": "b"}}}


def sidecar_of(p: dict[str, Any], native: bool) -> dict[str, Any]:
    where = p["spec"]["initContainers"] if native else p["spec"]["containers"]
    assert where[0]["name"] == I.SIDECAR_NAME
    assert sum(c["name"] == I.SIDECAR_NAME for c in [*p["spec"].get("initContainers", []),
                                                     *p["spec"]["containers"]]) == 1
    return where[0]  # type: ignore[no-any-return]


# -- start-up ------------------------------------------------------------------------------------------
def test_start_up_stores_a_certificate_and_sets_the_ca_bundle(cluster: FakeApiServer, native: WebhookProcess,
                                                               tmp_path: Path) -> None:
    secret = cluster.get(SECRET)
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert base64.b64decode(secret["data"]["ca.crt"]) == native.ca_pem  # what the API server will trust
    assert cluster.count("GET", "/version") >= 1 and cluster.count("GET", "/pods/objfs-webhook-0") == 1
    assert "native sidecar" in native.log()
    written = list((native.workdir / "tls").iterdir())
    assert written and all(os.stat(p).st_mode & 0o077 == 0 for p in written)
    # A second replica uses the same certificate: no new Secret, the same caBundle.
    puts = cluster.count("PUT", SECRET)
    second = start_webhook(cluster, tmp_path / "replica")
    try:
        assert cluster.count("PUT", SECRET) == puts and second.ca_pem == native.ca_pem
        assert second.mutate(pod(INJECT))[1]["allowed"]
    finally:
        second.stop()


def test_health_and_unknown_paths(native: WebhookProcess) -> None:
    ctx = ssl.create_default_context(cadata=native.ca_pem.decode())
    conn = http.client.HTTPConnection("127.0.0.1", native.port, timeout=30)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", native.port)), server_hostname=SERVICE_NAME)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"ok\n"
    conn.close()
    assert native.post(b"{}", "/other")[0] == 404


def test_plain_http_and_wrong_names_are_refused(native: WebhookProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", native.port, timeout=30)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("POST", "/mutate", body=b"{}")
        conn.getresponse().read()
    ctx = ssl.create_default_context(cadata=native.ca_pem.decode())
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(socket.create_connection(("127.0.0.1", native.port)), server_hostname="evil.example")


# -- the mutation ----------------------------------------------------------------------------------------
def test_annotated_pod_gets_a_native_sidecar(native: WebhookProcess) -> None:
    before = pod(INJECT)
    after, response = native.mutate(copy.deepcopy(before))
    side = sidecar_of(after, native=True)
    assert side["restartPolicy"] == "Always" and side["image"] == IMAGE and side["imagePullPolicy"] == "IfNotPresent"
    assert side["command"] == ["objfs", "sidecar", "--dir", "/objfs-tmp"]
    assert side["volumeMounts"] == [{"name": "objfs-tmp", "mountPath": "/objfs-tmp"}]
    sc = side["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (65534, 65534, True)
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert side["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    assert after["spec"]["volumes"] == [{"name": "objfs-tmp", "emptyDir": {}}]
    assert after["spec"]["containers"] == before["spec"]["containers"]  # the app is untouched
    assert "warnings" not in response
    # Idempotent: the injected pod sent again gets no patch.
    again, response = native.mutate(copy.deepcopy(after))
    assert "patch" not in response and again == after


def test_pod_without_annotation_or_objfs_volume_is_left_alone(native: WebhookProcess) -> None:
    for p in (pod(), pod({"other": "x"}, volumes=[{"name": "cfg", "configMap": {"name": "c"}}]),
              pod(volumes=[{"name": "d", "csi": {"driver": "other.csi.dev"}}])):
        response = native.review(p)
        assert response["allowed"] is True and "patch" not in response


def test_inline_objfs_volume_gets_the_sidecar_unless_opted_out(native: WebhookProcess) -> None:
    after, _ = native.mutate(pod(volumes=[{"name": "cfg", "emptyDir": {}}, INLINE]))
    sidecar_of(after, native=True)
    assert [v["name"] for v in after["spec"]["volumes"]] == ["cfg", "data", "objfs-tmp"]
    response = native.review(pod({I.INJECT_ANNOTATION: "false"}, volumes=[INLINE]))
    assert response["allowed"] and "patch" not in response


def test_claims_are_looked_up(native: WebhookProcess) -> None:
    def claim(name: str) -> dict[str, Any]:
        return {"name": name, "persistentVolumeClaim": {"claimName": name}}

    # bound to an objfs PV; not yet bound, objfs StorageClass; not yet bound, an objfs PV made for it
    for name in ("models", "pending", "prebound"):
        after, response = native.mutate(pod(volumes=[claim(name)]))
        sidecar_of(after, native=True)
        assert "warnings" not in response
    template = {"spec": {"storageClassName": "objfs-prefix"}}
    ephemeral = {"name": "scratch", "ephemeral": {"volumeClaimTemplate": template}}
    sidecar_of(native.mutate(pod(volumes=[ephemeral]))[0], native=True)
    for name in ("disk", "other", "prebound-disk"):
        response = native.review(pod(volumes=[claim(name)]))
        assert "patch" not in response and "warnings" not in response
    response = native.review(pod(volumes=[claim("missing")]))  # 404: cannot tell, say so
    assert "patch" not in response and "could not tell" in response["warnings"][0]
    assert "missing" in native.log()


def test_existing_containers_and_volumes_are_kept_in_order(native: WebhookProcess) -> None:
    init = [{"name": "setup", "image": "busybox"}, {"name": "istio", "image": "proxy", "restartPolicy": "Always"}]
    volumes = [{"name": "a", "emptyDir": {}}, {"name": "objfs-tmp", "emptyDir": {"medium": "Memory"}}]
    before = pod(INJECT, volumes=volumes, init=copy.deepcopy(init), containers=["app", "helper"])
    after, _ = native.mutate(copy.deepcopy(before))
    assert [c["name"] for c in after["spec"]["initContainers"]] == ["objfs-sidecar", "setup", "istio"]
    assert after["spec"]["initContainers"][1:] == init
    assert after["spec"]["containers"] == before["spec"]["containers"]
    assert after["spec"]["volumes"] == before["spec"]["volumes"]  # the pod's own objfs-tmp emptyDir is used


def test_objfs_tmp_that_is_not_an_emptydir_is_not_touched(native: WebhookProcess) -> None:
    response = native.review(pod(INJECT, volumes=[{"name": "objfs-tmp", "hostPath": {"path": "/x"}}]))
    assert response["allowed"] and "patch" not in response and "not an emptyDir" in response["warnings"][0]


def test_regular_container_before_1_29(legacy: WebhookProcess) -> None:
    before = pod(INJECT, init=[{"name": "setup", "image": "busybox"}], containers=["app", "helper"])
    after, _ = legacy.mutate(copy.deepcopy(before))
    side = sidecar_of(after, native=False)
    assert "restartPolicy" not in side and side["image"] == IMAGE
    assert [c["name"] for c in after["spec"]["containers"]] == ["objfs-sidecar", "app", "helper"]
    assert after["spec"]["initContainers"] == before["spec"]["initContainers"]
    assert after["metadata"]["annotations"] == {**INJECT, "kubectl.kubernetes.io/default-container": "app"}
    assert "regular container" in legacy.log()
    # No annotations at all (found through an inline volume): the annotation map is created.
    after, _ = legacy.mutate(pod(volumes=[INLINE]))
    assert after["metadata"]["annotations"] == {"kubectl.kubernetes.io/default-container": "app"}
    assert legacy.mutate(copy.deepcopy(after))[1].get("patch") is None


def test_resource_annotations(native: WebhookProcess) -> None:
    res = sidecar_of(native.mutate(pod({**INJECT, "objfs.csi.dev/sidecar-cpu-request": "250m",
                                        "objfs.csi.dev/sidecar-memory-request": "1Gi",
                                        "objfs.csi.dev/sidecar-cpu-limit": "2",
                                        "objfs.csi.dev/sidecar-memory-limit": "2Gi"}))[0], True)["resources"]
    assert res == {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    # A limit under the default request lowers the request; "" removes the default limit.
    res = sidecar_of(native.mutate(pod({**INJECT, "objfs.csi.dev/sidecar-memory-limit": "64Mi"}))[0], True)["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == "64Mi"
    res = sidecar_of(native.mutate(pod({**INJECT, "objfs.csi.dev/sidecar-memory-limit": ""}))[0], True)["resources"]
    assert res == {"requests": {"cpu": "100m", "memory": "128Mi"}}


@pytest.mark.parametrize(("annotations", "message"), [
    ({"objfs.csi.dev/sidecar-memory-limit": "512MB"}, "sidecar-memory-limit: '512MB' is not a Kubernetes quantity"),
    ({"objfs.csi.dev/sidecar-cpu-request": "-1"}, "sidecar-cpu-request"),
    ({"objfs.csi.dev/sidecar-memory-request": "4Gi", "objfs.csi.dev/sidecar-memory-limit": "1Gi"}, "above"),
    ({"objfs.csi.dev/sidecar-memory-limit": "0"}, "limit of 0"),
    ({"objfs.csi.dev/sidecar-memory": "1Gi"}, "unknown annotation objfs.csi.dev/sidecar-memory"),
    ({"objfs.csi.dev/inject": "yes"}, 'must be "true" or "false"'),
])
def test_invalid_annotations_are_denied_with_a_clear_message(native: WebhookProcess, annotations: dict[str, str],
                                                             message: str) -> None:
    response = native.review(pod({**INJECT, **annotations}, volumes=[INLINE]))
    assert response["allowed"] is False and "patch" not in response
    assert message in response["status"]["message"] and response["status"]["message"].startswith("objfs: ")


def test_other_objects_and_operations_are_allowed_unchanged(native: WebhookProcess) -> None:
    response = native.review({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"annotations": INJECT}},
                             kind="ConfigMap")
    assert response["allowed"] and "patch" not in response
    response = native.review(pod(INJECT), operation="UPDATE")
    assert response["allowed"] and "patch" not in response


def test_malformed_input_fails_safe(native: WebhookProcess) -> None:
    for body in (b"not json", b"[]", b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}',
                 b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "u"}}'):
        status, answer = native.post(body)
        assert status == 400 and answer, body  # no uid to answer to: the API server applies failurePolicy Ignore
    # A review the webhook can answer but a pod it cannot make sense of: allowed, unchanged, logged.
    for broken in ({"metadata": {"annotations": INJECT}, "spec": "nonsense"},
                   {"metadata": {"annotations": INJECT}, "spec": {"containers": [{"name": "a"}], "volumes": "x"}},
                   {"metadata": "nonsense"}, "a string"):
        response = native.review(broken)
        assert response["allowed"] is True and "patch" not in response, broken
    assert "unexpected error; allowing the object unchanged" in native.log()
    assert native.mutate(pod(INJECT))[1]["allowed"]  # and it keeps serving


def test_quantities() -> None:
    assert I.parse_quantity("100m") * 10 == 1
    assert I.parse_quantity("1Ki") == 1024 and I.parse_quantity("1k") == 1000 and I.parse_quantity("2e3") == 2000
    assert I.parse_quantity("0.5") == I.parse_quantity("500m")
    for bad in ("", "1.2.3", "-1", "1MB", "Mi", "1 Gi", "1e"):
        with pytest.raises(ValueError):
            I.parse_quantity(bad)
