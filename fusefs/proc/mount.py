"""``objfs mount`` and ``objfs unmount``: a bucket as a FUSE filesystem on this machine.

``objfs mount`` as root mounts with mount(2) here and then runs a detached ``objfs serve`` on the
FUSE fd (``fusefs.proc.spawn``), the path the CSI node plugin takes; otherwise libfuse mounts
through fusermount3. Every user error is a ``UsageError`` (one line for the user) and leaves
nothing mounted.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusefs import errors, kernel
from fusefs.config import Credentials, MountConfig, parse_size, parse_source
from fusefs.proc.spawn import ServePipes, serve_command
from fusefs.wire import handoff

if TYPE_CHECKING:
    from fusefs.proc.service_process import ServiceProcess

READY_TIMEOUT = 60.0
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
#: how this module runs ``objfs`` for the processes it starts
OBJFS = [sys.executable, "-m", "fusefs.proc.cli"]


class UsageError(Exception):
    """One line for the user."""




# -- mount ------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/objfs"
    return os.path.join(os.path.expanduser("~"), ".cache", "objfs")


def _aws_credentials() -> Credentials:
    """Credentials the server must be handed: only keys from this process's environment, which
    the server does not inherit (it gets them through its config pipe instead).

    Every other source of the standard AWS chain (shared files and profiles, ``credential_process``,
    SSO, web identity/IRSA, container and instance roles) is left for the server to resolve
    itself: boto3 then refreshes temporary credentials before they expire, where keys frozen
    here would stop working with their token."""
    try:
        import boto3

        creds = boto3.session.Session().get_credentials()
    except Exception as exc:
        raise UsageError(f"cannot read AWS credentials: {exc}") from None
    if creds is None or getattr(creds, "method", None) != "env":
        return Credentials()
    frozen = creds.get_frozen_credentials()
    return Credentials(access_key_id=frozen.access_key, secret_access_key=frozen.secret_key,
                       session_token=frozen.token)


def build_config(args: argparse.Namespace) -> MountConfig:
    backend, bucket, prefix = parse_source(args.source)
    creds = _aws_credentials() if backend == "s3" else Credentials()
    cache_dir = None if args.no_cache else os.path.abspath(args.cache_dir or default_cache_dir())
    return MountConfig(
        backend=backend, bucket=bucket, prefix=prefix, endpoint_url=args.endpoint_url, region=args.region,
        credentials=creds, read_only=args.read_only, cache_dir=cache_dir,
        cache_size=parse_size(args.cache_size), metadata_ttl=args.metadata_ttl,
        uid=os.getuid() if args.uid is None else args.uid, gid=os.getgid() if args.gid is None else args.gid,
        file_mode=args.file_mode, dir_mode=args.dir_mode, allow_other=args.allow_other,
        file_metadata=args.file_metadata,
        prefetch=tuple(args.prefetch), fs_name=f"objfs:{args.source}"[:200],
        metrics_address=_metrics_address(args.metrics_address),
    )


def _metrics_address(address: str) -> str:
    if address:
        from fusefs.metrics import parse_address

        try:
            parse_address(address)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return address


def _check_mountpoint(path: str) -> str:
    target = os.path.abspath(path)
    if kernel.find_mount(target) is not None:
        # Never stat a mount that may be a dead FUSE mount: it would hang.
        raise UsageError(f"{target} is already a mount point: unmount it first")
    if not os.path.exists(target):
        raise UsageError(f"mount point {target} does not exist: create the directory first")
    if not os.path.isdir(target):
        raise UsageError(f"mount point {target} is not a directory")
    return target


def _check_store(config: MountConfig) -> None:
    import trio

    from fusefs.proc.serve import MountError, check_policy, check_store
    from fusefs.store import AsyncStore, open_store

    try:
        store = AsyncStore(open_store(config), config.tuning.max_concurrent_requests)
        trio.run(check_store, store, check_policy(config))
    except MountError as exc:
        raise UsageError(str(exc)) from None
    except errors.StoreError as exc:
        raise UsageError(str(exc)) from None


@dataclass
class _Service:
    """``--data-service process``: the data service beside the mount, and the server's grant."""

    process: ServiceProcess
    grant: socket.socket


def _start_service(config: MountConfig, cmd: list[str], debug: bool) -> _Service:
    """Start the data service (this user, this environment minus the keys it gets over its link)
    and open the mount's grant. It runs until its link closes: the server keeps a copy."""
    from fusefs.proc.service_process import ServiceProcess

    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    # a daemon like the server: its output must not hold the caller's terminal or pipe open
    process = ServiceProcess(cmd, config.cache_dir, config.cache_size if config.cache_dir else 0, env=env,
                             own_session=True, self_register=os.geteuid() == 0, log_path="" if debug else os.devnull)
    try:
        return _Service(process, process.grant("mount", config))
    except Exception as exc:
        process.close()
        raise UsageError(f"the data service did not start: {exc}") from None


def cmd_mount(args: argparse.Namespace) -> int:
    config = build_config(args)
    target = _check_mountpoint(args.mountpoint)
    _check_store(config)  # fail before mounting anything
    if config.cache_dir:
        try:
            os.makedirs(config.cache_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create cache directory {config.cache_dir}: {exc.strerror}") from None
    service = None
    if args.data_service == "process":
        service = _start_service(config, OBJFS, args.debug)
    try:
        return _mount(args, config, target, service)
    finally:
        if service is not None:
            service.grant.close()
            service.process.detach()  # the server keeps the service's link open from here on


def _mount(args: argparse.Namespace, config: MountConfig, target: str, service: _Service | None) -> int:
    if os.geteuid() != 0:
        return _mount_unprivileged(config, target, args.foreground, service)
    fd = kernel.mount_fuse(target, fsname=config.fs_name, read_only=config.read_only,
                           allow_other=config.allow_other)
    if args.foreground:
        return _serve_foreground(config, target, fd, service)
    try:
        error = _spawn_serve(config, fd, target, args.debug, service)
    finally:
        os.close(fd)
    if error is not None:
        _unmount_quietly(target)
        raise UsageError(error)
    kernel.raise_readahead(target, config.tuning.readahead_kb)  # the server is ready: INIT comes at once
    return 0


def _serve_foreground(config: MountConfig, target: str, fd: int, service: _Service | None) -> int:
    from fusefs.proc.serve import MountError, run

    try:
        def ready() -> None:
            # The loop has not started yet: raise readahead from a thread once INIT is through.
            kernel.raise_readahead_soon(target, config.tuning.readahead_kb)

        if service is None:
            run(config, f"/dev/fd/{fd}", ready, unmount_target=target)
        else:
            run(config.server_view(), f"/dev/fd/{fd}", ready, unmount_target=target, grant=service.grant)
    except MountError as exc:
        raise UsageError(str(exc)) from None
    finally:
        _unmount_quietly(target)
    return 0


def _mount_unprivileged(config: MountConfig, target: str, foreground: bool, service: _Service | None) -> int:
    if foreground:
        from fusefs.proc.serve import MountError, run

        try:
            if service is None:
                run(config, target)
            else:
                run(config.server_view(), target, grant=service.grant)
        except MountError as exc:
            raise UsageError(str(exc)) from None
        return 0
    error = _spawn_serve(config, None, target, False, service)
    if error is not None:
        raise UsageError(error)
    return 0


def _spawn_serve(config: MountConfig, fuse_fd: int | None, target: str, debug: bool,
                 service: _Service | None = None) -> str | None:
    """Start a detached ``objfs serve``; None once it is ready, else the error line."""
    grant_fd = link_fd = None
    if fuse_fd is not None:
        os.set_inheritable(fuse_fd, True)
    if service is not None:
        grant_fd, link_fd = service.grant.fileno(), service.process.link_fd()
        config = config.server_view()
    pipes = ServePipes()
    try:
        cmd, fds = serve_command(OBJFS, pipes.config_r, pipes.ready_w, fuse_fd=fuse_fd, mountpoint=target,
                                 grant_fd=grant_fd, service_link_fd=link_fd, debug=debug)
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        log_target = subprocess.DEVNULL
        proc = subprocess.Popen(cmd, pass_fds=fds, start_new_session=True, env=env, stdin=subprocess.DEVNULL,
                                stdout=log_target, stderr=None if debug else log_target, cwd="/")
    except BaseException:
        pipes.close()
        raise
    pipes.started()
    status = pipes.hand_over(config, READY_TIMEOUT)
    if status == handoff.READY:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    if status is None:
        return f"the filesystem server did not answer within {READY_TIMEOUT:.0f}s"
    message = handoff.error_message(status)
    if message is not None:
        return message
    return "the filesystem server did not start" + (f" ({status})" if status else "")


def _unmount_quietly(target: str) -> None:
    if kernel.find_mount(target) is None:
        return
    try:
        kernel.unmount(target, lazy=True)
    except OSError:
        pass


# -- unmount ----------------------------------------------------------------------------------
def cmd_unmount(path: str) -> int:
    target = os.path.abspath(path)
    m = kernel.find_mount(target)
    if m is None:
        raise UsageError(f"{target} is not mounted")
    if os.geteuid() == 0:
        try:
            kernel.unmount(target)
        except OSError as exc:
            raise UsageError(f"cannot unmount {target}: {exc.strerror}") from None
        return 0
    r = subprocess.run(["fusermount3", "-u", target], capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"cannot unmount {target}: {r.stderr.strip() or 'fusermount3 failed'}")
    return 0
