"""Ranged GETs that skip botocore's request pipeline, for the one request a read path is made of.

botocore spends about a millisecond of CPU per request in its pipeline (event hooks, parameter
validation, serialisation, response parsing) on top of signing and HTTP. Measured here for a
64 KiB ranged GetObject against the benchmark's store: 1.67 ms of CPU through ``get_object``
against 0.52 ms signed by botocore's SigV4 signer and sent through its HTTP session. A walk of
small files is one GET per file, so the pipeline was most of a FUSE server's CPU there.

What stays botocore's: the object's URL (learned from a GetObject that botocore itself sent and
that succeeded, so after any region redirect and in its addressing style), the credentials
(refreshable ones still refresh), the signer and the HTTP session (TLS verification, proxies,
the connection pool). What this adds is the two headers (Range, If-Match) and the status.

Only a 200/206 answer is used. Anything else goes back to botocore, which sends the request again
and turns the answer into the right error: a 404 or 412 here is then confirmed by botocore before
anyone sees it; any other status (a redirect, an auth error: this path's URL or signature may be
what is wrong) also turns this path off for the store.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

log = logging.getLogger(__name__)

#: statuses that say something about the object, not about this path: botocore confirms them
_OBJECT_ANSWERS = {404, 412, 416}


def _key_path(key: str) -> str:
    # How botocore escapes a key in the URL path (percent_encode with "/~" safe).
    return "/" + quote(key, safe="/~")


class DirectGet:
    """Sends ranged GETs for one boto3 S3 client once it has learned the URL prefix."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._prefix: str | None = None
        self._region = "us-east-1"
        self.enabled = True
        self.sent = 0  # GETs answered by this path (for tests and stats)
        self._pending: dict[int, str] = {}
        try:
            self._http = client._endpoint.http_session
            self._signer = client._request_signer
        except AttributeError:  # another botocore layout: the pipeline it is, everywhere
            self.enabled = False
            return
        client.meta.events.register("before-parameter-build.s3.GetObject", self._note_key)
        client.meta.events.register("after-call.s3.GetObject", self._learn)

    @property
    def ready(self) -> bool:
        return self.enabled and self._prefix is not None

    # -- learning the URL from botocore's own requests -----------------------------------------
    def _note_key(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if self._prefix is None and "Key" in params:
            context["objfs_key"] = params["Key"]

    def _learn(self, http_response: Any, context: dict[str, Any], **_: Any) -> None:
        key = context.get("objfs_key")
        if self._prefix is not None or key is None or not 200 <= http_response.status_code < 300:
            return
        parts = urlsplit(http_response.url)
        path = _key_path(key)
        if parts.query or not parts.path.endswith(path):
            log.info("ranged GETs keep botocore's pipeline: unexpected URL form %s", parts.path)
            self.enabled = False
            return
        self._region = (context.get("signing") or {}).get("region") or self._client.meta.region_name or "us-east-1"
        self._prefix = http_response.url[: -len(path)] if path else http_response.url

    # -- sending ---------------------------------------------------------------------------------
    def get(self, key: str, start: int, length: int, version: str | None) -> Any | None:
        """The raw urllib3 response of a 200/206 answer (the caller reads and releases it), or
        None when botocore must send this request (and has learned what it needs for the next)."""
        if not self.ready:
            return None
        credentials = getattr(self._signer, "_credentials", None)
        if credentials is None:  # anonymous or not yet resolved: botocore's path knows what to do
            return None
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        if version:
            headers["If-Match"] = f'"{version}"'
        request = AWSRequest("GET", f"{self._prefix}{_key_path(key)}", headers=headers, stream_output=True)
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        response = self._http.send(request.prepare())
        if response.status_code in (200, 206):
            self.sent += 1
            return response.raw
        response.raw.close()  # its body (an error document) is not read: do not reuse the connection
        if response.status_code not in _OBJECT_ANSWERS:
            log.warning("ranged GETs go back to botocore's pipeline: the store answered %d to a direct GET",
                        response.status_code)
            self.enabled = False
        return None
