"""A mount keeps working when its temporary credentials rotate.

``objfs mount`` hands the server only keys from its own environment; every other source of the
AWS chain is resolved by the server itself, so boto3 refreshes temporary credentials before
they expire (keys frozen at mount time stopped working with their token: instance roles, IRSA,
SSO). Here the source is a ``credential_process`` in an AWS config file, the chain's plain
"ask a program" entry: the program is ``cat`` of a JSON file the test rewrites, so it stands
in for the identity service (STS, IMDS, the SSO portal) and nothing else is mocked. Its
credentials expire within botocore's refresh window, so every request asks it again, as boto3
does near any expiry.

The rotation is real: ``rclone serve s3`` is restarted on the same port and data accepting
only the new key pair. A mount given the old keys explicitly (what freezing them amounted to)
is refused from then on (EACCES), which shows the old keys really stopped working; the mount
that resolves its own credentials reads and writes on.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fusefs import kernel
from fusefs.config import Credentials, MountConfig
from testing.fsmount import Mounted
from testing.servers import RcloneS3, free_port, random_bytes

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parents[2]


def write_credentials(path: Path, access_key: str, secret_key: str) -> None:
    """What the identity service hands out now: temporary keys that expire in five minutes
    (inside botocore's ten-minute mandatory refresh window). Replaced atomically."""
    doc = {"Version": 1, "AccessKeyId": access_key, "SecretAccessKey": secret_key,
           "SessionToken": "token-" + secrets.token_hex(8),
           "Expiration": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()}
    tmp = path.with_suffix(".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


@pytest.fixture
def rotating(tmp_path: Path) -> Iterator[list[RcloneS3]]:
    """``rclone serve s3`` with a first key pair; the test appends its restarts."""
    servers = [RcloneS3(tmp_path / "s3" / "data", port=free_port()).start()]
    yield servers
    servers[-1].stop()


def test_mount_keeps_working_when_credentials_rotate(
    rotating: list[RcloneS3], tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    first = rotating[0]
    bucket = first.create_bucket()
    first.client().put_object(Bucket=bucket, Key="before.txt", Body=b"before")
    creds = tmp_path / "creds.json"
    write_credentials(creds, first.access_key, first.secret_key)
    config_file = tmp_path / "aws-config"
    config_file.write_text(f"[default]\ncredential_process = cat {creds}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(config_file), AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_EC2_METADATA_DISABLED="true")
    target = tmp_path / "mnt"
    target.mkdir()
    r = subprocess.run([sys.executable, "-m", "fusefs.proc.cli", "mount", f"s3://{bucket}", str(target),
                        "--endpoint-url", first.endpoint, "--no-cache"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    # the control: the same store with the first keys frozen into the mount's configuration
    frozen = mount_fs(MountConfig(backend="s3", bucket=bucket, endpoint_url=first.endpoint,
                                  credentials=first.credentials), name="frozen")
    try:
        assert (target / "before.txt").read_bytes() == b"before"
        assert (frozen.path / "before.txt").read_bytes() == b"before"

        # Rotation: the identity service hands out new keys, and the old ones stop working.
        second = RcloneS3(first.root, port=first.port)
        write_credentials(creds, second.access_key, second.secret_key)
        first.stop()
        rotating.append(second.start())
        data = random_bytes(3 * 1024 * 1024 + 1, seed=77)
        second.client().put_object(Bucket=bucket, Key="after.bin", Body=data)

        assert (target / "after.bin").read_bytes() == data  # a name never seen: LIST/HEAD and GETs
        (target / "written.txt").write_bytes(b"written after the rotation")
        assert second.read_object(bucket, "written.txt") == b"written after the rotation"
        with pytest.raises(OSError) as exc:
            (frozen.path / "after.bin").read_bytes()
        assert exc.value.errno == errno.EACCES  # the old keys really were revoked
    finally:
        if kernel.find_mount(str(target)) is not None:
            kernel.unmount(str(target), lazy=True)


def test_objfs_mount_hands_over_environment_keys_only(tmp_path: Path) -> None:
    """What ``objfs mount`` puts into the server's configuration: keys from its environment (the
    server does not inherit them), nothing from any source that can refresh."""
    from fusefs.proc.mount import _aws_credentials

    creds = tmp_path / "creds.json"
    write_credentials(creds, "AKIAROTATING", "secret")
    config_file = tmp_path / "aws-config"
    config_file.write_text(f"[default]\ncredential_process = cat {creds}\n")
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update(AWS_CONFIG_FILE=str(config_file), AWS_SHARED_CREDENTIALS_FILE="/dev/null",
                          AWS_EC2_METADATA_DISABLED="true")
        assert _aws_credentials() == Credentials()  # resolved (and refreshed) by the server
        os.environ.update(AWS_ACCESS_KEY_ID="AKIAENV", AWS_SECRET_ACCESS_KEY="envsecret")
        assert _aws_credentials() == Credentials(access_key_id="AKIAENV", secret_access_key="envsecret")
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)
