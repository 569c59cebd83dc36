"""The ``objfs`` command: its arguments and which process each subcommand runs.

``mount`` and ``unmount``: ``fusefs.proc.mount``; ``sidecar`` (a pod's servers): ``fusefs.proc.sidecar``;
internal ones, run by ``objfs mount`` and the CSI node plugin: ``serve`` (one FUSE server, the
contract in ``fusefs.proc.spawn``): ``fusefs.proc.serve``; ``zygote``: ``fusefs.proc.zygote``;
``data-service``: ``fusefs.proc.dataservice``. Every user error is one line on stderr and a
non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fusefs.config import ConfigError
from fusefs.proc.mount import UsageError, cmd_mount, cmd_unmount


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
            from fusefs.proc import zygote

            return zygote.run(args.socket_fd)
        if args.command == "sidecar":
            from fusefs.proc import sidecar

            return sidecar.run(args.dir)
        if args.command == "data-service":
            from fusefs.proc import dataservice as daemon

            logging.getLogger().setLevel(os.environ.get("OBJFS_LOG_LEVEL", "INFO").upper())
            return daemon.run(args)
        return cmd_serve(args)
    except (UsageError, ConfigError) as exc:
        print(f"objfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_serve(args: argparse.Namespace) -> int:
    # --service-link-fd: nothing to do but keep it open; the data service lives while it is
    from fusefs.proc.serve import serve_fds

    return serve_fds(args.config_fd, args.fuse_fd, args.ready_fd, args.mountpoint, args.grant_fd, args.regrant_fd)


if __name__ == "__main__":
    sys.exit(main())
