"""What an inline (ephemeral) volume may name: the node plugin's InlinePolicy (the gRPC refusals are in
test_csi_rpc's publish validation)."""

from __future__ import annotations

import grpc
import pytest

from csi import params as P
from csi.errors import FailedPrecondition
from csi.main import parse_args
from fusefs.config import Credentials

KEYS = Credentials(access_key_id="AKIA", secret_access_key="s")
GCS_KEY = Credentials(service_account_json="{}")
NONE = Credentials()


def refused(policy: P.InlinePolicy, creds: Credentials, **attrs: str) -> str:
    with pytest.raises(FailedPrecondition) as ei:
        policy.check(P.parse(attrs), creds)
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    return ei.value.message


def test_default_policy_wants_a_secret_and_no_endpoint() -> None:
    default = P.InlinePolicy()
    default.check(P.parse({"bucket": "any-bucket"}), KEYS)
    default.check(P.parse({"bucket": "any-bucket", "backend": "gcs"}), GCS_KEY)
    assert "--allow-inline-node-identity" in refused(default, NONE, bucket="any-bucket")
    # An S3 secret holding only a GCS key (or nothing usable) is still the node's identity.
    assert "nodePublishSecretRef" in refused(default, GCS_KEY, bucket="any-bucket")
    assert "--inline-endpoints" in refused(default, KEYS, bucket="b12", endpoint="http://10.0.0.1:9000")


def test_flags() -> None:
    args = parse_args(["--endpoint", "unix:///x.sock", "--node-id", "n", "--allow-inline-node-identity",
                       "--inline-buckets", "public-*, models", "--inline-endpoints", "https://minio.local/,"])
    policy = P.InlinePolicy.from_flags(args.allow_inline_node_identity, args.inline_buckets, args.inline_endpoints)
    assert policy == P.InlinePolicy(True, ("public-*", "models"), ("https://minio.local",))
    policy.check(P.parse({"bucket": "public-images"}), NONE)
    policy.check(P.parse({"bucket": "models", "endpoint": "https://minio.local"}), NONE)
    message = refused(policy, KEYS, bucket="payroll")
    assert "'payroll'" in message and "--inline-buckets" in message and "public-*, models" in message
    assert "--inline-endpoints" in refused(policy, KEYS, bucket="models", endpoint="https://minio.local.evil")
    anywhere = P.InlinePolicy.from_flags(False, "*", "*")
    anywhere.check(P.parse({"bucket": "b12", "endpoint": "http://127.0.0.1:9"}), KEYS)
    nothing = P.InlinePolicy.from_flags(True, "", "")
    assert "(allowed: none)" in refused(nothing, KEYS, bucket="b12")
