"""Attacks on the admission webhook, run as ``objfs-csi --mode webhook`` processes against the fake API
server (testing/kubemock.py), over TLS as the API server talks to it."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from csi.webhook import certs
from csi.webhook import inject as I
from testing.kubemock import FakeApiServer
from tests.csi import test_webhook as W
from tests.csi.test_webhook import INJECT, MWC, SECRET, WebhookProcess, fake_cluster, pod, start_webhook

# The webhook of tests/csi/test_webhook.py (native sidecars, claim lookups) in front of its fake cluster.
cluster, hook = W.cluster, W.native


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


# -- connections ---------------------------------------------------------------------------------------
def test_idle_connections_do_not_start_threads_without_bound(cluster: FakeApiServer, tmp_path: Path) -> None:
    """Attack: open many connections and say nothing (no TLS handshake). A thread per connection (the
    old ThreadingHTTPServer) let anyone who can reach the webhook start threads without end; now a fixed
    pool serves them, idle ones are dropped after the connection timeout, and a real review behind
    them in the listen backlog is still answered."""
    workers, idle_count = 3, 10
    hook = start_webhook(cluster, tmp_path, "--webhook-workers", str(workers), "--webhook-connection-timeout", "1")
    idle = [socket.create_connection(("127.0.0.1", hook.port), timeout=60) for _ in range(idle_count)]
    try:
        # Connected before the review: the server accepts them first (the backlog is FIFO), so the
        # answer below comes only after every idle connection was taken by a worker.
        after, response = hook.mutate(pod(INJECT))
        assert response["allowed"] and any(c["name"] == I.SIDECAR_NAME for c in after["spec"]["initContainers"])
        # the workers and the main thread, never one per connection
        assert threads_of(hook.proc.pid) <= workers + 1
        for s in idle:
            assert s.recv(1) == b""  # each idle connection is closed by the server, none kept forever
        assert hook.mutate(pod(INJECT))[1]["allowed"]  # and it keeps serving
    finally:
        for s in idle:
            s.close()
        hook.stop()


# -- bodies ---------------------------------------------------------------------------------------------
def review_body(request: Any) -> bytes:
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}).encode()


def test_deeply_nested_body_gets_a_400(hook: WebhookProcess) -> None:
    """Attack: a body of 100000 nested lists. json's decoder recursed until RecursionError, which killed
    the connection's handler without an answer; now it is a 400 that says why, and the webhook keeps
    serving."""
    depth = 100_000
    for body in (b"[" * depth + b"]" * depth,
                 review_body({"uid": "u"})[:-2] + b', "x": ' + b"[" * depth + b"]" * depth + b"}}"):
        status, answer = hook.post(body)
        assert status == 400 and b"nested too deeply" in answer
    assert hook.mutate(pod(INJECT))[1]["allowed"]


BAD_BODIES = [
    b"null", b"42", b'"AdmissionReview"', b"[{}]", b"\xff\xfe",
    review_body(None), review_body("request"), review_body({"uid": 7}),
    review_body({"uid": "u", "kind": "Pod", "operation": "CREATE", "object": {}}),
    review_body({"uid": "u", "kind": {"group": "", "kind": "Pod"}, "operation": ["CREATE"], "object": {}}),
    review_body({"uid": "u", "kind": {"group": "", "kind": "Pod"}, "operation": "CREATE", "namespace": {},
                 "object": {}}),
    review_body({"uid": "u", "kind": {"group": 0, "kind": "Pod"}, "operation": "CREATE", "object": {}}),
    review_body({"uid": "u", "kind": {"group": "", "kind": "Pod"}, "operation": "CREATE", "subResource": 1,
                 "object": {}}),
]


def test_bodies_of_the_wrong_shape_get_a_400(hook: WebhookProcess) -> None:
    """Attack: JSON of every wrong shape (not an object, no request, fields of the wrong types). Each is
    a 400 with a message, not an answer built from a misread request (fields of the wrong type were
    taken for an allowed pod)."""
    for body in BAD_BODIES:
        status, answer = hook.post(body)
        assert status == 400 and answer.strip(), (body, answer)


# -- the pod's own "objfs-sidecar" ---------------------------------------------------------------------
def own_sidecar(**changes: Any) -> dict[str, Any]:
    """The sidecar exactly as the webhook injects it (native), with ``changes``."""
    container = I.sidecar_container(I.SidecarSettings(image="registry.example/objfs-csi:9.9.9", native=True,
                                                      image_pull_policy="IfNotPresent"), {})
    container.update(changes)
    return {k: v for k, v in container.items() if v is not None}


@pytest.mark.parametrize(("where", "container"), [
    ("containers", {"name": I.SIDECAR_NAME, "image": "evil.example/listener:1"}),
    ("initContainers", {"name": I.SIDECAR_NAME, "image": "evil.example/listener:1", "restartPolicy": "Always"}),
    ("initContainers", own_sidecar(image="evil.example/objfs-csi:9.9.9")),
    ("initContainers", own_sidecar(command=["sh", "-c", "nc -lU /objfs-tmp/objfs.sock"])),
    ("initContainers", own_sidecar(args=["--debug"])),
    ("initContainers", own_sidecar(securityContext={"runAsUser": 0, "privileged": True})),
    ("containers", own_sidecar(restartPolicy=None)),
], ids=["image", "init-image", "same-name-other-image", "command", "args", "root", "regular-container"])
@pytest.mark.parametrize("annotations", [INJECT, {I.INJECT_ANNOTATION: "false"}, None],
                         ids=["inject", "opt-out", "none"])
def test_a_pod_with_its_own_objfs_sidecar_is_denied(hook: WebhookProcess, where: str, container: dict[str, Any],
                                                    annotations: dict[str, str] | None) -> None:
    """Attack: a pod brings its own container named objfs-sidecar. The webhook took the name for "already
    injected" and let it through, so the pod's own listener received its volumes' hand-over (and what
    came with it); now any such container that is not exactly the injected sidecar is refused."""
    p = pod(annotations)
    p["spec"].setdefault(where, []).insert(0, copy.deepcopy(container))
    response = hook.review(p)
    assert response["allowed"] is False and "patch" not in response
    message = response["status"]["message"]
    assert message.startswith("objfs: ") and "objfs-sidecar" in message and "reserved" in message


def test_reinvocation_on_an_injected_pod_is_still_allowed(hook: WebhookProcess) -> None:
    """Not an attack: the API server re-invokes the webhook (reinvocationPolicy) on the pod it already
    patched, maybe with fields the API server defaults. The webhook's own sidecar is recognised and
    the pod allowed unchanged."""
    after, _ = hook.mutate(pod(INJECT, init=[{"name": "setup", "image": "busybox"}]))
    again, response = hook.mutate(copy.deepcopy(after))
    assert "patch" not in response and again == after
    defaulted = copy.deepcopy(after)
    side = defaulted["spec"]["initContainers"][0]
    side["securityContext"]["procMount"] = "Default"
    side.update(terminationMessagePath="/dev/termination-log", args=[])
    side["resources"] = {"limits": {"memory": "1Gi"}}  # a LimitRange may change them
    assert "patch" not in hook.mutate(defaulted)[1]


# -- certificate renewal -------------------------------------------------------------------------------
def serving_cert(days_ago: float) -> certs.ServingCert:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
    return certs.generate(certs.service_names("objfs-webhook", "objfs"), now)


def put_secret(api: FakeApiServer, cert: certs.ServingCert, previous: bytes = b"") -> None:
    data = {k: base64.b64encode(v).decode() for k, v in zip(certs.KEYS, (cert.ca_pem, cert.cert_pem, cert.key_pem),
                                                             strict=True)}
    if previous:
        data["previous-ca.crt"] = base64.b64encode(previous).decode()
    api.put(SECRET, {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "objfs-webhook-tls"},
                     "type": "Opaque", "data": data})


def bundle_cas(api: FakeApiServer) -> list[bytes]:
    bundle = base64.b64decode(api.get(MWC)["webhooks"][0]["clientConfig"]["caBundle"])
    pem = serialization.Encoding.PEM
    return [c.public_bytes(pem) for c in x509.load_pem_x509_certificates(bundle)]


def verified_by(cert_pem: bytes, cas: list[bytes]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    for ca in cas:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def test_renewal_keeps_the_previous_ca_while_its_certificate_may_be_served(tmp_path: Path) -> None:
    """Attack (on availability): a replica renews the certificate near its end while the others still
    serve the old one. Writing the new CA alone into the caBundle made the API server refuse every
    other replica's TLS (with failurePolicy Ignore: pods admitted without their sidecar); now the
    bundle holds the new CA and the previous one until the old certificate expires, and an expired
    previous CA is dropped."""
    with fake_cluster(tmp_path / "api", "30+") as api:
        old = serving_cert(days_ago=4 * 365 + 30)  # under a year left: renewed at start-up
        expired = serving_cert(days_ago=6 * 365)
        put_secret(api, old, previous=expired.ca_pem)
        first = start_webhook(api, tmp_path / "renewing")
        try:
            renewed = certs._from_secret(api.get(SECRET))
            assert renewed is not None and renewed.ca_pem != old.ca_pem
            cas = bundle_cas(api)
            assert cas[0] == renewed.ca_pem and old.ca_pem in cas and expired.ca_pem not in cas
            assert verified_by(old.cert_pem, cas) and verified_by(renewed.cert_pem, cas)
            assert first.mutate(pod(INJECT))[1]["allowed"]  # it serves the new one, trusted by the bundle
            # Another replica starting later takes the renewed certificate and keeps the old CA in the bundle.
            second = start_webhook(api, tmp_path / "later")
            try:
                assert old.ca_pem in bundle_cas(api) and verified_by(old.cert_pem, bundle_cas(api))
                assert second.mutate(pod(INJECT))[1]["allowed"]
            finally:
                second.stop()
        finally:
            first.stop()


def test_uid_is_echoed_for_good_reviews(hook: WebhookProcess) -> None:
    """Not an attack: the shape checks leave a well-formed review alone."""
    uid = str(uuid.uuid4())
    status, answer = hook.post(review_body({"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                            "operation": "CREATE", "namespace": "team", "object": pod()}))
    assert status == 200 and json.loads(answer)["response"] == {"uid": uid, "allowed": True}
