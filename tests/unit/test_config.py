"""MountConfig, sizes and sources: the values that cross from the CSI plugin to ``objfs serve``."""

from __future__ import annotations

import json
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusefs.config import (
    ConfigError,
    Credentials,
    GiB,
    KiB,
    MiB,
    MountConfig,
    Tuning,
    normalize_prefix,
    parse_size,
    parse_source,
)

# -- MountConfig JSON round trip -----------------------------------------------------------------

_segment = st.text(
    st.characters(exclude_characters="/", codec="utf-8"), min_size=1, max_size=12
).filter(lambda s: s not in (".", ".."))
_prefix = st.lists(_segment, max_size=4).map(lambda parts: "/".join(parts) + ("/" if parts else ""))
_opt_text = st.none() | st.text(max_size=40)
_finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)

_credentials = st.builds(
    Credentials, access_key_id=_opt_text, secret_access_key=_opt_text, session_token=_opt_text,
    service_account_json=_opt_text,
)
_tuning = st.builds(
    Tuning, block_size=st.integers(1, 2**40), max_prefetch_blocks=st.integers(0, 1024),
    max_concurrent_requests=st.integers(1, 1024), memory_blocks=st.integers(0, 1024),
    part_size=st.integers(5 * MiB, 5 * GiB), request_timeout=_finite, retry_deadline=_finite,
)
_configs = st.builds(
    MountConfig,
    backend=st.sampled_from(["s3", "gcs"]),
    bucket=st.text(min_size=1, max_size=63),
    prefix=_prefix,
    endpoint_url=st.none() | st.just("http://127.0.0.1:9000"),
    region=st.none() | st.sampled_from(["us-east-1", "eu-west-3"]),
    credentials=_credentials,
    read_only=st.booleans(),
    cache_dir=st.none() | st.text(min_size=1, max_size=30),
    cache_size=st.integers(0, 2**50),
    metadata_ttl=_finite,
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    file_mode=st.integers(0, 0o7777),
    dir_mode=st.integers(0, 0o7777),
    allow_other=st.booleans(),
    prefetch=st.lists(st.text(max_size=20), max_size=4).map(tuple),
    tuning=_tuning,
)


@given(_configs)
def test_json_round_trip(config: MountConfig) -> None:
    text = config.to_json()
    back = MountConfig.from_json(text)
    assert back == config
    assert MountConfig.from_json(text.encode()) == config
    assert json.loads(back.to_json()) == json.loads(text)


def test_from_json_fills_defaults() -> None:
    c = MountConfig.from_json('{"backend": "gcs", "bucket": "b", "prefix": "x"}')
    assert c == MountConfig(backend="gcs", bucket="b", prefix="x/")
    assert c.credentials == Credentials() and c.tuning == Tuning() and c.prefetch == ()


def test_from_json_validates() -> None:
    with pytest.raises(ConfigError):
        MountConfig.from_json('{"backend": "azure", "bucket": "b"}')
    with pytest.raises(ConfigError):
        MountConfig.from_json('{"backend": "s3", "bucket": "b", "prefix": "a/../b"}')


# -- secrets never leak through printing ---------------------------------------------------------

def _secret_config() -> tuple[MountConfig, list[str]]:
    values = [secrets.token_hex(12) for _ in range(4)]
    creds = Credentials(access_key_id=values[0], secret_access_key=values[1], session_token=values[2],
                        service_account_json=json.dumps({"private_key": values[3]}))
    return MountConfig(backend="s3", bucket="bkt", credentials=creds), values


def test_redaction_hides_every_secret() -> None:
    config, values = _secret_config()
    shown = [repr(config), str(config), f"{config!r}", f"{config}", json.dumps(config.redacted()),
             repr(config.credentials), str(config.credentials), repr(config.credentials.redacted()),
             f"{config} {config!r}"]
    for text in shown:
        for value in values:
            assert value not in text
    assert config.redacted()["credentials"] == {
        "access_key_id": "***", "secret_access_key": "***", "session_token": "***", "service_account_json": "***",
    }
    assert config.redacted()["bucket"] == "bkt"  # the rest stays readable


def test_redaction_marks_absent_credentials_as_absent() -> None:
    creds = Credentials(access_key_id="AKIA" + secrets.token_hex(4))
    assert creds.redacted() == {"access_key_id": "***", "secret_access_key": None, "session_token": None,
                                "service_account_json": None}


def test_json_carries_the_secrets() -> None:
    """to_json is what ``objfs serve`` receives over its pipe: it must hold the real values."""
    config, values = _secret_config()
    assert MountConfig.from_json(config.to_json()).credentials == config.credentials
    assert values[1] in config.to_json()


# -- parse_size ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("123", 123), ("512M", 512 * MiB), ("512m", 512 * MiB), ("10GiB", 10 * GiB), ("10Gi", 10 * GiB),
     ("10GB", 10 * GiB), ("1.5g", int(1.5 * GiB)), ("  3 k ", 3 * KiB), ("4KiB", 4 * KiB), ("2T", 2048 * GiB),
     ("1P", 1024 * 1024 * GiB), ("7b", 7), ("7B", 7), (42, 42), (0, 0)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", " ", "abc", "M", "-1", "1.2.3", "10 XB", "10x", "1e3", "ten", "5 M B", "10i",
                                  "10ib", "0x10", "1,5G", "--5"])
def test_parse_size_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


def test_parse_size_negative_int() -> None:
    with pytest.raises(ConfigError):
        parse_size(-1)


@given(st.integers(0, 2**40), st.sampled_from(["", "K", "Ki", "KiB", "M", "Mi", "G", "GiB"]))
def test_parse_size_units(n: int, unit: str) -> None:
    scale = {"": 1, "K": KiB, "M": MiB, "G": GiB}[unit[:1]]
    assert parse_size(f"{n}{unit}") == n * scale


# -- parse_source / prefixes ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("source", "expected"),
    [("s3://bucket", ("s3", "bucket", "")), ("s3://bucket/", ("s3", "bucket", "")),
     ("s3://my.bucket-1/a/b", ("s3", "my.bucket-1", "a/b/")), ("s3://b12/a/b/", ("s3", "b12", "a/b/")),
     ("gs://data/models", ("gcs", "data", "models/")), ("gcs://data/x", ("gcs", "data", "x/")),
     ("s3://bkt//lead", ("s3", "bkt", "lead/")), ("s3://bkt/trail//", ("s3", "bkt", "trail/")),
     ("gs://under_score/d", ("gcs", "under_score", "d/"))],
)
def test_parse_source(source: str, expected: tuple[str, str, str]) -> None:
    assert parse_source(source) == expected


@pytest.mark.parametrize(
    ("source", "reason"),
    [("http://bucket/x", "malformed"), ("s3:/bucket", "malformed"), ("bucket/prefix", "malformed"), ("", "malformed"),
     ("S3://bucket", "malformed"), ("s3://", "no bucket"), ("gs:///prefix", "no bucket"),
     ("s3://a", "invalid bucket"), ("s3://bad bucket/x", "invalid bucket"), ("s3://-dash", "invalid bucket"),
     ("s3://bkt/../etc", "invalid prefix"), ("s3://bkt/a/../../b", "invalid prefix"),
     ("s3://bkt/a/./b", "invalid prefix"),
     ("s3://bkt/a//b", "invalid prefix"), ("gs://bkt/..", "invalid prefix")],
)
def test_parse_source_refuses(source: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_source(source)


def test_prefix_normalisation_in_config() -> None:
    assert MountConfig(backend="s3", bucket="b", prefix="/a/b").prefix == "a/b/"
    assert MountConfig(backend="s3", bucket="b", prefix="a/b/").prefix == "a/b/"
    assert MountConfig(backend="s3", bucket="b", prefix="///").prefix == ""
    assert normalize_prefix("") == ""
    with pytest.raises(ConfigError, match=r"\.\."):
        MountConfig(backend="s3", bucket="b", prefix="a/../../etc")
    assert MountConfig(backend="gcs", bucket="b", prefix="m/x").source == "gs://b/m/x"
    assert MountConfig(backend="s3", bucket="b").source == "s3://b"


@given(st.lists(_segment, min_size=1, max_size=5))
def test_prefix_normalise_is_idempotent(parts: list[str]) -> None:
    p = normalize_prefix("/".join(parts))
    assert p.endswith("/") and normalize_prefix(p) == p and p.split("/")[:-1] == parts


@pytest.mark.parametrize(
    "kwargs",
    [{"backend": "ftp"}, {"bucket": ""}, {"metadata_ttl": -1}, {"uid": -1}, {"gid": 2**32}, {"file_mode": 0o10000},
     {"dir_mode": -1}],
)
def test_mount_config_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"backend": "s3", "bucket": "b"}
    with pytest.raises(ConfigError):
        MountConfig(**{**base, **kwargs})  # type: ignore[arg-type]


# -- bucket names: the rule that is broken, in words (issue: "s3://b" was said to have bad characters)
@pytest.mark.parametrize(
    ("source", "message"),
    [("s3://b", "S3 bucket names are 3 to 63 characters long, this one has 1"),
     ("s3://" + "a" * 64, "S3 bucket names are 3 to 63 characters long, this one has 64"),
     ("gs://ab", "GCS bucket names are 3 to 63 characters long (222 with dots), this one has 2"),
     ("gs://" + "a" * 64, "GCS bucket names are 3 to 63 characters long (222 with dots), this one has 64"),
     ("gs://a." + "b" * 64, "each dot-separated part of a GCS bucket name is 1 to 63 characters long"),
     ("s3://Upper", "'U' is not allowed: use only lower-case letters, digits, '.' and '-' in S3 bucket names"),
     ("s3://under_score", "'_' is not allowed: use only lower-case letters, digits, '.' and '-' in S3 bucket names"),
     ("s3://-dash", "it must start and end with a lower-case letter or a digit"),
     ("s3://192.168.1.1", "it must not look like an IP address"),
     ("s3://a..b", "S3 bucket names must not contain two adjacent periods"),
     ("gs://googlebucket", "GCS bucket names must not start with 'goog'"),
     ("gs://my-google-data", "GCS bucket names must not contain 'google'")],
)
def test_bucket_name_errors_name_the_rule(source: str, message: str) -> None:
    bucket = source.split("://", 1)[1]
    with pytest.raises(ConfigError) as exc:
        parse_source(source)
    assert str(exc.value) == f"invalid bucket name {bucket!r}: {message}"


@pytest.mark.parametrize("source", ["s3://abc", "s3://a" + "b" * 62, "gs://under_score", "gs://a.b.c",
                                    "gs://" + ".".join(["a" * 63] * 3), "s3://my.bucket-1"])
def test_valid_bucket_names_pass(source: str) -> None:
    assert parse_source(source)[1] == source.split("://", 1)[1]


def test_a_config_that_uses_no_newer_field_reads_as_before() -> None:
    # A pod's sidecar of an earlier version refuses keys it does not know: fields added later are
    # written only when set.
    plain = MountConfig(backend="s3", bucket="b")
    assert not {"snapshot", "file_metadata"} & set(json.loads(plain.to_json()))
    assert MountConfig.from_json(plain.to_json()) == plain
    snap = MountConfig(backend="s3", bucket="b", snapshot="snapshots/s1/manifest.json", read_only=True)
    assert json.loads(snap.to_json())["snapshot"] == "snapshots/s1/manifest.json"
    assert MountConfig.from_json(snap.to_json()) == snap
    kept = MountConfig(backend="s3", bucket="b", file_metadata=True)
    assert json.loads(kept.to_json())["file_metadata"] is True and MountConfig.from_json(kept.to_json()) == kept
