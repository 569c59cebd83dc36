"""The ``objfs`` command: ``mount``, ``unmount``, ``sidecar`` and the internal ``serve`` and ``zygote``.

``objfs serve --config-fd N --fuse-fd M [--ready-fd K]`` is the contract with the CSI node plugin:
the MountConfig arrives as JSON on fd N (never argv or environment, which /proc shows), fd M is an
already-mounted /dev/fuse, and fd K gets ``ready\\n`` once the store answered and the loop is about
to serve, or ``error: <one line>\\n`` before a non-zero exit.

``objfs mount`` as root follows the same path (mount(2) here, then a detached ``objfs serve``);
otherwise libfuse mounts through fusermount3. Every user error is one line on stderr and a
non-zero exit, and leaves nothing mounted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import errors, handoff, kernel
from .config import ConfigError, Credentials, MountConfig, parse_size, parse_source

if TYPE_CHECKING:
    from .service.process import ServiceProcess

log = logging.getLogger("objfs")

READY_TIMEOUT = 60.0
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


class UsageError(Exception):
    """One line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="objfs", description="Object storage buckets as FUSE filesystems.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]")
    m.add_argument("source")
    m.add_argument("mountpoint")
    m.add_argument("--foreground", "-f", action="store_true")
    m.add_argument("--read-only", action="store_true")
    m.add_argument("--endpoint-url")
    m.add_argument("--region")
    m.add_argument("--cache-dir")
    m.add_argument("--cache-size", default="10G")
    m.add_argument("--no-cache", action="store_true")
    m.add_argument("--metadata-ttl", type=float, default=60.0)
    m.add_argument("--uid", type=int)
    m.add_argument("--gid", type=int)
    m.add_argument("--file-mode", type=_octal, default=0o644)
    m.add_argument("--dir-mode", type=_octal, default=0o755)
    m.add_argument("--allow-other", action="store_true")
    m.add_argument("--file-metadata", action="store_true",
                   help="keep each file's mtime, mode, owner and symlinks in its object's metadata (s3fs's "
                        "names); on S3 a listed directory then costs a HEAD per file")
    m.add_argument("--prefetch", action="append", default=[], help="glob of keys warmed into the node cache")
    m.add_argument("--metrics-address", default="", metavar="HOST:PORT",
                   help="serve Prometheus metrics of this mount on HOST:PORT/metrics (default: off)")
    m.add_argument("--data-service", choices=("here", "process"), default="here",
                   help="where the credentials, the store client and the node cache live: in the mount's own "
                        "server (here), or in a data service process beside it that the server reaches only "
                        "through one socket, as a pod's sidecar does on a Kubernetes node (process)")
    m.add_argument("--debug", action="store_true")
    u = sub.add_parser("unmount", help="unmount an objfs mount")
    u.add_argument("mountpoint")
    s = sub.add_parser("serve", help="internal: serve an inherited /dev/fuse fd (used by objfs-csi)")
    s.add_argument("--config-fd", type=int, required=True)
    s.add_argument("--fuse-fd", type=int)
    s.add_argument("--mountpoint", help="without --fuse-fd: mount here; with it: unmount here on SIGTERM")
    s.add_argument("--ready-fd", type=int)
    s.add_argument("--grant-fd", type=int, help="a connection to the node's data service for this volume")
    s.add_argument("--regrant-fd", type=int, help="where the node plugin hands over the next grant connection")
    s.add_argument("--service-link-fd", type=int,
                   help="the control link of a data service that lives as long as this server (kept open)")
    s.add_argument("--debug", action="store_true")
    ds = sub.add_parser("data-service", help="internal: the node's data service (started by objfs-csi)")
    ds.add_argument("--control-fd", type=int, required=True)
    ds.add_argument("--cache-dir", default="")
    ds.add_argument("--cache-size", type=int, default=0)
    ds.add_argument("--backing-root", default="", help="a read-only mount of --cache-dir")
    ds.add_argument("--broker-socket", default="")
    ds.add_argument("--metrics-path", default="", help="where the service writes its figures (the node cache's)")
    ds.add_argument("--self-register", action="store_true",
                    help="register passthrough backing files itself (root, one trust domain: objfs mount)")
    z = sub.add_parser("zygote", help="internal: fork objfs serve processes on request (used by objfs-csi)")
    z.add_argument("--socket-fd", type=int, required=True)
    sc = sub.add_parser("sidecar", help="serve the objfs volumes of this pod, handed over by objfs-csi")
    sc.add_argument("--dir", required=True, help="the pod's objfs-tmp emptyDir (the hand-over socket lives there)")
    sc.add_argument("--debug", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        print(f"objfs: {exc}", file=sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "unmount":
            return cmd_unmount(args.mountpoint)
        if args.command == "zygote":
            from . import zygote

            return zygote.run(args.socket_fd)
        if args.command == "sidecar":
            from . import sidecar

            return sidecar.run(args.dir)
        if args.command == "data-service":
            from .service import daemon

            logging.getLogger().setLevel(os.environ.get("OBJFS_LOG_LEVEL", "INFO").upper())
            return daemon.run(args)
        return cmd_serve(args)
    except (UsageError, ConfigError) as exc:
        print(f"objfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


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
        from .metrics import parse_address

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

    from .mount import MountError, check_policy, check_store
    from .store import AsyncStore, open_store

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
    from .service.process import ServiceProcess

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
        service = _start_service(config, [sys.executable, "-m", "fusefs.cli"], args.debug)
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
    from .mount import raise_readahead

    raise_readahead(target, config.tuning.readahead_kb)
    return 0


def _serve_foreground(config: MountConfig, target: str, fd: int, service: _Service | None) -> int:
    from .mount import MountError, raise_readahead, run

    try:
        def ready() -> None:
            # The loop has not started yet: raise readahead from a thread once INIT is through.
            threading.Thread(target=raise_readahead, args=(target, config.tuning.readahead_kb), daemon=True).start()

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
        from .mount import MountError, run

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
    cfg_r, cfg_w = os.pipe()
    ready_r, ready_w = os.pipe()
    cmd = [sys.executable, "-m", "fusefs.cli", "serve", "--config-fd", str(cfg_r), "--ready-fd", str(ready_w),
           "--mountpoint", target]
    fds = [cfg_r, ready_w]
    if fuse_fd is not None:
        os.set_inheritable(fuse_fd, True)
        cmd += ["--fuse-fd", str(fuse_fd)]
        fds.append(fuse_fd)
    if service is not None:
        link = service.process.link_fd()
        cmd += ["--grant-fd", str(service.grant.fileno()), "--service-link-fd", str(link)]
        fds += [service.grant.fileno(), link]
        config = config.server_view()
    if debug:
        cmd.append("--debug")
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    log_target = subprocess.DEVNULL
    proc = subprocess.Popen(cmd, pass_fds=fds, start_new_session=True, env=env, stdin=subprocess.DEVNULL,
                            stdout=log_target, stderr=None if debug else log_target, cwd="/")
    os.close(cfg_r)
    os.close(ready_w)
    handoff.send_config(cfg_w, config)
    try:
        status = handoff.read_status(ready_r, READY_TIMEOUT)
    finally:
        os.close(ready_r)
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


# -- serve ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    # --service-link-fd: nothing to do but keep it open; the data service lives while it is
    return serve(args.config_fd, args.fuse_fd, args.ready_fd, args.mountpoint, args.grant_fd, args.regrant_fd)


def serve(config_fd: int, fuse_fd: int | None, ready_fd: int | None, mountpoint_arg: str | None,
          grant_fd: int | None = None, regrant_fd: int | None = None) -> int:
    """``objfs serve``: also what a server forked by ``objfs zygote`` runs. With ``grant_fd``
    the volume's data comes from the node's data service; the config then holds no secret."""
    status = handoff.StatusReporter(ready_fd)
    try:
        config = handoff.receive_config(config_fd)
    except (OSError, ValueError, TypeError) as exc:
        status.error(f"unreadable mount config: {exc}")
        print(f"objfs serve: unreadable mount config: {exc}", file=sys.stderr)
        return 1
    if fuse_fd is not None:
        mountpoint, unmount_target = f"/dev/fd/{fuse_fd}", mountpoint_arg
    elif mountpoint_arg:
        mountpoint, unmount_target = mountpoint_arg, None
    else:
        status.error("objfs serve needs --fuse-fd or --mountpoint")
        return 2
    from .mount import MountError, run

    grant = socket.socket(fileno=grant_fd) if grant_fd is not None else None
    regrant = socket.socket(fileno=regrant_fd) if regrant_fd is not None else None
    try:
        run(config, mountpoint, status.ready, unmount_target, grant, regrant)
    except MountError as exc:
        status.error(str(exc))
        print(f"objfs serve: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.exception("server failed")
        status.error(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
