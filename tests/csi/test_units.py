"""Pure units of the CSI plugin: volume IDs, bucket names, parameters, state records."""

from __future__ import annotations

import os
import re
import stat

import pytest

from csi import params as P
from csi import volume_id as V
from csi.errors import InvalidArgument
from csi.main import parse_args
from csi.node.dataservice import GrantRecords
from csi.node.state import TEMP_PREFIX, PublishRecord, StateStore
from csi.services.controller import bucket_name_for
from fusefs.config import Credentials, MountConfig
from fusefs.proc.cli import _parser
from fusefs.proc.mount import build_config

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


def test_bucket_names_are_valid_stable_and_distinct() -> None:
    long_name = "sanity-controller-create-maxlen-64CFA3DC-89820C15" + "A" * 79
    names = [long_name, long_name[:-1] + "B", "pvc-0f6a3c1e-8c1b-4a57-9f0e-2b7d1a0c9e11", "X", "xn--bad", "--"]
    buckets = [bucket_name_for(n) for n in names]
    for b in buckets:
        assert BUCKET_RE.match(b) and len(b) <= 63 and not b.startswith("xn--"), b
    assert len(set(buckets)) == len(buckets)
    assert bucket_name_for(long_name) == buckets[0]


def test_volume_id_round_trip() -> None:
    vid = V.VolumeId("p", "s3", "shared", "vols/pvc-1/", "http://127.0.0.1:9000", "eu-west-1")
    assert V.parse(str(vid)) == vid
    b = V.VolumeId("b", "gcs", "pvc-1-abc", "", "", "")
    assert V.parse(str(b)) == b and b.owns_bucket


@pytest.mark.parametrize("text", [
    "", "fake-vol-id", "objfs1:b:s3:bucket", "objfs1:x:s3:bkt::::", "objfs1:b:ftp:bkt::::",
    "objfs1:b:s3:bkt:a%2F..%2Fb/:::", "objfs1:p:s3:bkt::::", "objfs1:b:s3:bkt:../:::",
    "objfs1:b:s3:b:::", "objfs1:b:s3:bkt::javascript%3Aalert:", "objfs1:b:s3:bkt:a b/:::",
])
def test_malformed_volume_ids_are_rejected(text: str) -> None:
    with pytest.raises(V.MalformedVolumeId):
        V.parse(text)


def test_parameters_parse_and_reject_unknown_keys() -> None:
    p = P.parse({"bucket": "models", "prefix": "llama/", "metadataTTL": "30", "uid": "1000", "gid": "2000",
                 "fileMode": "0640", "dirMode": "0750", "prefetch": "*.json, config/*", "cache": "none",
                 "csi.storage.k8s.io/pod.name": "ignored",
                 "storage.kubernetes.io/csiProvisionerIdentity": "1764745432123-8081-objfs.csi.dev"})
    assert (p.bucket, p.prefix, p.metadata_ttl, p.uid, p.gid) == ("models", "llama/", 30.0, 1000, 2000)
    assert (p.file_mode, p.dir_mode, p.prefetch, p.cache) == (0o640, 0o750, ("*.json", "config/*"), False)
    assert not p.file_metadata
    kept = P.parse({"bucket": "models", "fileMetadata": "True"})
    assert kept.file_metadata
    assert P.mount_config(kept, {}, read_only=False, cache_dir=None).file_metadata
    mount_args = ["mount", "s3://models/llama", "/mnt", "--no-cache"]
    assert not build_config(_parser().parse_args(mount_args)).file_metadata  # objfs mount: off unless asked
    assert build_config(_parser().parse_args([*mount_args, "--file-metadata"])).file_metadata
    with pytest.raises(InvalidArgument, match="readOnly"):
        P.parse({"readOnly": "true"})
    for bad in ({"prefix": "a/../b"}, {"uid": "-1"}, {"fileMode": "999"}, {"cache": "ram"},
                {"backend": "azure"}, {"endpoint": "ftp://x"}, {"bucket": "Bad_Bucket"}, {"metadataTTL": "x"},
                {"prefetch": "../secret"}, {"fileMetadata": "yes"}):
        with pytest.raises(InvalidArgument):
            P.parse(bad)


def test_credentials_need_both_halves() -> None:
    with pytest.raises(InvalidArgument, match="both"):
        P.credentials({"accessKeyID": "k"}, "s3")
    creds = P.credentials({"accessKeyID": "k", "secretAccessKey": "s3cr3t-value", "other": "x"}, "s3")
    assert creds.access_key_id == "k" and "s3cr3t-value" not in repr(creds)


def test_state_records_are_atomic_private_and_survive_reload(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "state")
    store = StateStore(root)
    rec = PublishRecord(volume_id="v", target="/t/mount", pid=123, start_time=456, read_only=True,
                        fingerprint="f", config={"bucket": "b"})
    store.put(rec)
    files = os.listdir(store.dir)
    assert len(files) == 1 and stat.S_IMODE(os.stat(os.path.join(store.dir, files[0])).st_mode) == 0o600
    assert StateStore(root).get("/t/mount") == rec and StateStore(root).all() == [rec]
    with open(os.path.join(store.dir, "junk.json"), "w") as f:
        f.write("{not json")
    assert StateStore(root).all() == [rec]
    store.delete("/t/mount")
    assert store.get("/t/mount") is None


def test_records_left_half_written_by_a_killed_plugin_are_removed_at_start(tmp_path: str) -> None:
    # A plugin killed between creating a record's temp file and renaming it leaves the temp file:
    # a grant's holds credentials (encrypted). The next plugin removes both kinds at start.
    root = os.path.join(str(tmp_path), "state")
    store = StateStore(root)
    grants = GrantRecords(root, os.path.join(str(tmp_path), "run", "grants.key"))
    config = MountConfig(backend="s3", bucket="b", credentials=Credentials(access_key_id="AK", secret_access_key="SK"))
    grants.put("/t/mount", config)
    for directory in (store.dir, grants.dir):
        with open(os.path.join(directory, TEMP_PREFIX + "killed"), "wb") as f:
            f.write(b"half")
    store.remove_leftovers()
    grants.remove_leftovers()
    assert os.listdir(store.dir) == []
    assert [n for n in os.listdir(grants.dir) if n.startswith(TEMP_PREFIX)] == []
    assert grants.get("/t/mount") == config  # the finished record stays


def test_a_failed_record_write_leaves_no_temp_file(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(os.path.join(str(tmp_path), "state"))

    def no_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError):
        store.put(PublishRecord(volume_id="v", target="/t/mount", pid=1, start_time=1, read_only=False,
                                fingerprint="f", config={}))
    assert os.listdir(store.dir) == []


def test_cache_size_flag(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--endpoint", "unix:///x.sock", "--node-id", "n"]
    assert parse_args(base).cache_size == 10 << 30
    assert parse_args([*base, "--cache-size=1.5G"]).cache_size == 3 << 29
    with pytest.raises(SystemExit):
        parse_args([*base, "--cache-size=lots"])
    assert "--cache-size: malformed size 'lots'" in capsys.readouterr().err
    config = P.mount_config(P.parse({"bucket": "models"}), {}, read_only=False, cache_dir="/c", cache_size=7 << 20)
    assert (config.cache_dir, config.cache_size) == ("/c", 7 << 20)
