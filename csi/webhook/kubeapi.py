"""The few Kubernetes API calls the admission webhook makes, over HTTPS with its service account token.

Kept to the standard library (urllib + ssl): the webhook reads /version, its own pod (for the image to
inject), a Secret holding its serving certificate, the caBundle of its MutatingWebhookConfiguration,
and PVCs, PVs and StorageClasses to tell whether a pod's claims are objfs volumes.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


@dataclass
class KubeClient:
    base_url: str
    token_file: str = f"{SA_DIR}/token"
    ca_file: str = f"{SA_DIR}/ca.crt"
    timeout: float = 5.0

    @classmethod
    def in_cluster(cls, base_url: str = "", token_file: str = "", ca_file: str = "") -> KubeClient:
        """The API server from the flags, else from the environment every pod gets."""
        if not base_url:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ApiError(0, "not running in a cluster (no KUBERNETES_SERVICE_HOST): pass --kube-api URL")
            base_url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(base_url.rstrip("/"), token_file or f"{SA_DIR}/token", ca_file or f"{SA_DIR}/ca.crt")

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file if os.path.exists(self.ca_file) else None)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                timeout: float | None = None) -> Any:
        headers = {"Accept": "application/json"}
        # Projected tokens rotate: read it on every call.
        if os.path.exists(self.token_file):
            with open(self.token_file) as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout, context=self._context()) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise ApiError(e.code, f"{method} {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(0, f"{method} {path}: {getattr(e, 'reason', e)}") from None
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float | None = None) -> Any:
        return self.request("GET", path, timeout=timeout)

    # -- what the webhook asks ----------------------------------------------------------------
    def server_version(self) -> tuple[int, int]:
        """(major, minor) of the API server; managed clusters say minor "29+"."""
        v = self.get("/version")
        try:
            return int(re.sub(r"\D", "", str(v["major"]))), int(re.sub(r"\D.*", "", str(v["minor"])))
        except (KeyError, ValueError, TypeError):
            raise ApiError(0, f"/version answered {v!r}: no major/minor") from None

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get(f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}")  # type: ignore[no-any-return]

    def secret(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get(f"/api/v1/namespaces/{_q(namespace)}/secrets/{_q(name)}")  # type: ignore[no-any-return]

    def replace_secret(self, namespace: str, name: str, secret: dict[str, Any]) -> dict[str, Any]:
        """PUT: fails with 409 if someone else wrote it since we read it (resourceVersion)."""
        path = f"/api/v1/namespaces/{_q(namespace)}/secrets/{_q(name)}"
        return self.request("PUT", path, secret)  # type: ignore[no-any-return]

    def set_ca_bundle(self, config_name: str, ca_b64: str) -> int:
        """Put ``ca_b64`` into every webhook of the MutatingWebhookConfiguration; returns how many."""
        path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{_q(config_name)}"
        hooks = self.get(path).get("webhooks") or []
        ops: list[dict[str, Any]] = []
        for i, hook in enumerate(hooks):
            # "test" makes the patch fail rather than write into another webhook if the list changed.
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_b64})
        if ops:
            self.request("PATCH", path, ops, content_type="application/json-patch+json")
        return len(hooks)

    def claim(self, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{_q(namespace)}/persistentvolumeclaims/{_q(name)}"
        return self.get(path, timeout)  # type: ignore[no-any-return]

    def volume(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self.get(f"/api/v1/persistentvolumes/{_q(name)}", timeout)  # type: ignore[no-any-return]

    def volumes(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every PersistentVolume (one page: the webhook asks only for claims nothing else tells)."""
        return list(self.get("/api/v1/persistentvolumes", timeout).get("items") or [])

    def storage_class(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self.get(f"/apis/storage.k8s.io/v1/storageclasses/{_q(name)}", timeout)  # type: ignore[no-any-return]


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")
