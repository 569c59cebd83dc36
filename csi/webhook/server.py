"""``objfs-csi --mode webhook``: the mutating admission webhook that adds the objfs sidecar to pods.

It answers AdmissionReview v1 requests over HTTPS (``POST /mutate``; ``GET /healthz`` for probes).
Pods annotated ``objfs.csi.dev/inject: "true"``, or mounting objfs volumes (inline CSI volumes of the
driver; claims whose PV or StorageClass is objfs, looked up through the API), get the sidecar of
``csi.webhook.inject``. It fails safe: anything it cannot handle is allowed unchanged with a log line (and the
MutatingWebhookConfiguration says ``failurePolicy: Ignore``); the only pods it denies are ones whose
objfs annotations have values it cannot use, with a message naming the annotation, and ones that bring
their own container named ``objfs-sidecar`` other than the one it injects (``csi.webhook.inject.already_injected``).
Bodies that are not an AdmissionReview of the expected shape get HTTP 400. A fixed pool of workers
serves connections (``--webhook-workers``); idle ones are dropped after ``--webhook-connection-timeout``.

At start-up, unless told otherwise by flags, it reads the API server's version (native sidecars from
1.29), its own pod's image (the sidecar runs the same image), and its serving certificate from a
Secret (made there if missing: ``csi.webhook.certs``), and writes the CA into its MutatingWebhookConfiguration.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import selectors
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from csi.webhook import certs
from csi.webhook import inject as I
from csi.webhook.kubeapi import ApiError, KubeClient

log = logging.getLogger("objfs.webhook")
REVIEW_VERSION = "admission.k8s.io/v1"
MAX_BODY = 8 << 20  # a pod is at most ~1.5 MiB in etcd; an AdmissionReview carries it (and maybe oldObject)
LOOKUP_BUDGET = 3.0  # seconds of API lookups per review: the webhook's timeoutSeconds is 5
WORKERS = 16  # connections served at once; more wait in the listen backlog (a thread per connection had no cap)
# An idle or slow connection is dropped after this long: the API server answers a pod within its
# timeoutSeconds (5) and reconnects when it needs to, so a longer wait only lets idle sockets hold workers.
CONNECTION_TIMEOUT = 5.0
NATIVE_SIDECAR_VERSION = (1, 29)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("webhook (--mode webhook)")
    g.add_argument("--webhook-address", default="0.0.0.0:9443", help="HOST:PORT to serve HTTPS on ([::]:9443 for IPv6)")
    g.add_argument("--webhook-service", default="objfs-webhook", help="the webhook's Service (certificate names)")
    g.add_argument("--webhook-namespace", default=os.environ.get("POD_NAMESPACE", "objfs"))
    g.add_argument("--webhook-config", default="objfs-webhook",
                   help="the MutatingWebhookConfiguration whose caBundle is set at start-up")
    g.add_argument("--webhook-secret", default="objfs-webhook-tls",
                   help="Secret (in --webhook-namespace) that keeps the serving certificate for every replica")
    g.add_argument("--tls-cert-file", default="", help="serve this certificate instead (no Secret, no caBundle patch)")
    g.add_argument("--tls-key-file", default="")
    g.add_argument("--cert-dir", default="/tmp/objfs-webhook", help="where the serving certificate is written (0600)")
    g.add_argument("--sidecar-image", default="", help="image of the injected sidecar (default: the webhook's own)")
    g.add_argument("--sidecar-image-pull-policy", default="", choices=("", "Always", "IfNotPresent", "Never"))
    g.add_argument("--native-sidecars", choices=("auto", "always", "never"), default="auto",
                   help="inject an init container with restartPolicy Always (auto: if the API server is >= 1.29)")
    g.add_argument("--webhook-workers", type=int, default=WORKERS,
                   help="connections served at once (more wait in the listen backlog)")
    g.add_argument("--webhook-connection-timeout", type=float, default=CONNECTION_TIMEOUT,
                   help="seconds a connection may stay idle or silent before it is dropped")
    g.add_argument("--claim-lookups", choices=("on", "off"), default="on",
                   help="look PVCs up (their PV or StorageClass) to find objfs volumes; off: annotations and "
                        "inline volumes only")
    k = ap.add_argument_group("Kubernetes API (--mode webhook; --mode node with --launcher sidecar, see "
                              "--sidecar-exit-poll)")
    k.add_argument("--kube-api", default="", help="API server URL (default: the in-cluster one)")
    k.add_argument("--kube-token-file", default="", help="bearer token file (default: the service account's)")
    k.add_argument("--kube-ca-file", default="", help="CA of the API server (default: the service account's)")


# -- admission -----------------------------------------------------------------------------------
class BadReview(ValueError):
    """Not an AdmissionReview v1 we can answer (no uid to answer to): HTTP 400."""


def _allowed(uid: str, patch: I.Patch | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if warnings:
        response["warnings"] = warnings
    return response


def _denied(uid: str, message: str) -> dict[str, Any]:
    return {"uid": uid, "allowed": False, "status": {"code": 400, "reason": "BadRequest", "message": message}}


# request fields the webhook reads, and the JSON type each must have when present
_REQUEST_FIELDS: dict[str, tuple[type, str]] = {"kind": (dict, "an object"), "operation": (str, "a string"),
                                                "namespace": (str, "a string"), "subResource": (str, "a string")}


def _check_request_shape(request: dict[str, Any]) -> None:
    """BadReview unless the request's fields the webhook reads have their API types: a review of the
    wrong shape is not something to answer (the pod object itself is judged later, failing safe)."""
    for key, (kind, name) in _REQUEST_FIELDS.items():
        value = request.get(key)
        if value is not None and not isinstance(value, kind):
            raise BadReview(f"the AdmissionReview's request.{key} is not {name}")
    for key in ("group", "kind"):
        value = (request.get("kind") or {}).get(key)
        if value is not None and not isinstance(value, str):
            raise BadReview(f"the AdmissionReview's request.kind.{key} is not a string")


def _pod_name(pod: dict[str, Any], namespace: str) -> str:
    meta = pod.get("metadata") or {}
    return f"{namespace}/{meta.get('name') or (str(meta.get('generateName') or '') + '*')}"


class Webhook:
    def __init__(self, settings: I.SidecarSettings, kube: KubeClient | None = None) -> None:
        self.settings = settings
        self.kube = kube  # None: no claim lookups

    def review(self, body: bytes) -> dict[str, Any]:
        """The AdmissionReview answer to ``body``; BadReview if it is not a v1 AdmissionReview with a uid."""
        try:
            review = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadReview(f"the body is not JSON: {e}") from None
        except RecursionError:
            # json's decoder recurses once per nesting level and stops at the interpreter's recursion
            # limit; no AdmissionReview is nested anywhere near that deep.
            raise BadReview("the body is not an AdmissionReview: JSON nested too deeply") from None
        if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
            raise BadReview("the body is not an AdmissionReview")
        if review.get("apiVersion") != REVIEW_VERSION:
            raise BadReview(f"AdmissionReview {review.get('apiVersion')!r} is not supported: only {REVIEW_VERSION}")
        request = review.get("request")
        uid = request.get("uid") if isinstance(request, dict) else None
        if not isinstance(uid, str) or not uid:
            raise BadReview("the AdmissionReview has no request.uid")
        assert isinstance(request, dict)
        _check_request_shape(request)
        try:
            response = self._respond(uid, request)
        except Exception:
            # Fail safe: a pod we cannot make sense of is left as it is.
            log.exception("admission %s: unexpected error; allowing the object unchanged", uid)
            response = _allowed(uid)
        return {"apiVersion": REVIEW_VERSION, "kind": "AdmissionReview", "response": response}

    def _respond(self, uid: str, request: dict[str, Any]) -> dict[str, Any]:
        kind = request.get("kind") or {}
        if (kind.get("group"), kind.get("kind")) != ("", "Pod") or request.get("subResource"):
            return _allowed(uid)
        if request.get("operation") != "CREATE":
            return _allowed(uid)
        pod = request.get("object")
        if not isinstance(pod, dict):
            return _allowed(uid)
        namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
        name = _pod_name(pod, namespace)
        deadline = time.monotonic() + LOOKUP_BUDGET
        try:
            decision = I.decide(pod, namespace, self.settings, self._claim_check(deadline), self._class_check(deadline))
            patch = I.sidecar_patch(pod, self.settings) if decision.inject else None
        except I.Refused as e:
            log.warning("pod %s denied: %s", name, e)
            return _denied(uid, f"objfs: {e}")
        if patch:
            log.info("pod %s: adding the objfs sidecar (%s) because of %s", name,
                     "native" if self.settings.native else "container", decision.reason)
        else:
            log.debug("pod %s: no sidecar: %s", name, decision.reason)
        for w in decision.warnings:
            log.warning("pod %s: %s", name, w)
        return _allowed(uid, patch, decision.warnings)

    # -- claim lookups -----------------------------------------------------------------------------
    def _claim_check(self, deadline: float) -> I.ClaimCheck | None:
        kube = self.kube
        if kube is None:
            return None

        def check(namespace: str, claim: str) -> bool | None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return None
            def ours(pv: dict[str, Any]) -> bool:
                return bool(((pv.get("spec") or {}).get("csi") or {}).get("driver") == self.settings.driver_name)

            try:
                pvc = kube.claim(namespace, claim, timeout)
                spec = pvc.get("spec") or {}
                if spec.get("volumeName"):
                    return ours(kube.volume(spec["volumeName"], max(deadline - time.monotonic(), 0.1)))
            except ApiError as e:
                log.warning("looking up claim %s/%s: %s", namespace, claim, e)
                return None
            by_class = self._class_check(deadline)(spec["storageClassName"]) if spec.get("storageClassName") else None
            if by_class is not None:
                return by_class
            # Not bound yet, and no class that says (none, or one that does not exist: a claim made for
            # a PV created for it, whose binding may come after the pod): a PV bound to this claim in
            # advance (its claimRef) does. Listed only here, where nothing else can tell.
            try:
                for pv in kube.volumes(max(deadline - time.monotonic(), 0.1)):
                    ref = (pv.get("spec") or {}).get("claimRef") or {}
                    if (ref.get("namespace"), ref.get("name")) == (namespace, claim):
                        return ours(pv)
            except ApiError as e:
                log.warning("looking for a volume bound to claim %s/%s: %s", namespace, claim, e)
                return None
            return None if spec.get("storageClassName") else False

        return check

    def _class_check(self, deadline: float) -> Callable[[str], bool | None]:
        kube = self.kube

        def check(name: str) -> bool | None:
            timeout = deadline - time.monotonic()
            if kube is None or timeout <= 0:
                return None
            try:
                return bool(kube.storage_class(name, timeout).get("provisioner") == self.settings.driver_name)
            except ApiError as e:
                log.warning("looking up StorageClass %s: %s", name, e)
                return None

        return check


# -- HTTPS ---------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the API server keeps connections open
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Every read and write (the TLS handshake too) gives up after this: a client that stops
        # sending, or never starts, does not hold one of the few workers for long.
        self.connection.settimeout(self.server.connection_timeout)

    def handle(self) -> None:
        try:
            # The TLS handshake happens here, in this connection's thread, not in the accept loop.
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError) as e:
            log.debug("connection from %s: %s", self.client_address, e)

    def do_GET(self) -> None:
        if self.path in ("/healthz", "/readyz"):
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/mutate":
            self._send(404, b"not found: POST AdmissionReviews to /mutate\n", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, b"Content-Length required\n", "text/plain")
            return
        if not 0 <= length <= MAX_BODY:
            self._send(413, b"AdmissionReview too large\n", "text/plain")
            return
        body = self.rfile.read(length)
        try:
            answer = self.server.webhook.review(body)
        except BadReview as e:
            log.warning("bad request from %s: %s", self.client_address[0], e)
            self._send(400, f"{e}\n".encode(), "text/plain")
            return
        self._send(200, json.dumps(answer).encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


class _Server(HTTPServer):
    """An HTTPServer whose fixed pool of ``workers`` threads each accept and serve one connection at a
    time: at most that many connections are served at once and the rest wait in the listen backlog
    (a thread per connection, as ThreadingHTTPServer does, lets anyone who can connect start threads
    without end). ``shutdown`` stops the workers once their connection is done."""

    webhook: Webhook
    workers = WORKERS
    connection_timeout = CONNECTION_TIMEOUT
    request_queue_size = 128  # the listen backlog, where connections wait for a worker

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._stopping = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        # Every worker waits on the same socket and all wake for one connection: non-blocking, the
        # losers get BlockingIOError from accept() instead of sleeping in it past a shutdown.
        self.socket.setblocking(False)
        threads = [threading.Thread(target=self._work, args=(poll_interval,), name=f"webhook-{i}", daemon=True)
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _work(self, poll_interval: float) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if selector.select(poll_interval):
                    self._serve_one()

    def _serve_one(self) -> None:
        """Accept one connection and serve it to its end, in this worker."""
        try:
            request, client = self.get_request()
        except OSError:  # BlockingIOError: another worker took it
            return
        try:
            self.finish_request(request, client)
        except Exception:
            self.handle_error(request, client)
        finally:
            self.shutdown_request(request)

    def shutdown(self) -> None:
        self._stopping.set()


class _Server6(_Server):
    address_family = socket.AF_INET6


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--webhook-address {address!r}: use HOST:PORT, e.g. 0.0.0.0:9443")
    return host.strip("[]"), int(port)


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def serve(webhook: Webhook, address: tuple[str, int], context: ssl.SSLContext, workers: int = WORKERS,
          connection_timeout: float = CONNECTION_TIMEOUT) -> _Server:
    """An HTTPS server for ``webhook`` (not yet serving: call serve_forever)."""
    if workers < 1 or connection_timeout <= 0:
        raise ValueError("the webhook needs at least one worker and a positive connection timeout")
    server = (_Server6 if ":" in address[0] else _Server)(address, _Handler)
    server.webhook = webhook
    server.workers, server.connection_timeout = workers, connection_timeout
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


# -- start-up ------------------------------------------------------------------------------------
def wants_native(mode: str, kube: Callable[[], KubeClient], attempts: int = 10) -> bool:
    if mode != "auto":
        return mode == "always"
    for attempt in range(attempts):
        try:
            version = kube().server_version()
            native = version >= NATIVE_SIDECAR_VERSION
            log.info("API server %d.%d: the sidecar is injected as %s", *version,
                     "a native sidecar (init container, restartPolicy Always)" if native else "a regular container")
            return native
        except ApiError as e:
            if attempt == attempts - 1:
                # A native sidecar on a cluster that cannot run one would keep pods in Init forever.
                raise SystemExit(f"cannot read the API server's version ({e}): pass --native-sidecars always|never"
                                 ) from None
            log.warning("reading the API server's version: %s; retrying", e)
            time.sleep(min(2.0 ** attempt, 10.0))
    raise AssertionError("unreachable")


def own_image(kube: KubeClient) -> tuple[str, str]:
    """The image (and pull policy) of the container this webhook runs in, from its own pod."""
    name, namespace = os.environ.get("POD_NAME", ""), os.environ.get("POD_NAMESPACE", "")
    if not name or not namespace:
        raise SystemExit("no --sidecar-image and no POD_NAME/POD_NAMESPACE (downward API) to find the webhook's "
                         "own image: set one of them")
    containers = (kube.pod(namespace, name).get("spec") or {}).get("containers") or []
    mine = next((c for c in containers if c.get("name") == "objfs-webhook"), containers[0] if containers else None)
    if not mine or not mine.get("image"):
        raise SystemExit(f"pod {namespace}/{name} has no container with an image: pass --sidecar-image")
    return mine["image"], mine.get("imagePullPolicy", "")


def run(args: argparse.Namespace) -> int:
    client: list[KubeClient] = []

    def kube() -> KubeClient:
        if not client:
            try:
                client.append(KubeClient.in_cluster(args.kube_api, args.kube_token_file, args.kube_ca_file))
            except ApiError as e:
                raise SystemExit(str(e)) from None
        return client[0]

    native = wants_native(args.native_sidecars, kube)
    image, pull = args.sidecar_image, args.sidecar_image_pull_policy
    try:
        if not image:
            image, own_pull = own_image(kube())
            pull = pull or own_pull
        if args.tls_cert_file or args.tls_key_file:
            if not (args.tls_cert_file and args.tls_key_file):
                raise SystemExit("--tls-cert-file and --tls-key-file go together")
            cert_file, key_file = args.tls_cert_file, args.tls_key_file
        else:
            names = certs.service_names(args.webhook_service, args.webhook_namespace)
            serving = certs.ensure_in_secret(kube(), args.webhook_namespace, args.webhook_secret, names)
            cert_file, key_file = serving.write(args.cert_dir)
            # The previous CAs stay in the bundle: other replicas may still serve what they signed.
            bundle = serving.ca_bundle()
            count = kube().set_ca_bundle(args.webhook_config, base64.b64encode(bundle).decode())
            log.info("caBundle of MutatingWebhookConfiguration %s set (%d webhook(s), %d CA(s))", args.webhook_config,
                     count, bundle.count(b"-----BEGIN CERTIFICATE-----"))
    except ApiError as e:
        raise SystemExit(f"webhook start-up: {e}") from None
    settings = I.SidecarSettings(image=image, native=native, image_pull_policy=pull, driver_name=args.driver_name)
    webhook = Webhook(settings, kube() if args.claim_lookups == "on" else None)
    try:
        server = serve(webhook, parse_address(args.webhook_address), tls_context(cert_file, key_file),
                       args.webhook_workers, args.webhook_connection_timeout)
    except ValueError as e:
        raise SystemExit(f"--webhook-workers/--webhook-connection-timeout: {e}") from None

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("objfs webhook serving https://%s:%d/mutate (sidecar image %s)", *server.server_address[:2], image)
    server.serve_forever()
    server.server_close()
    return 0
