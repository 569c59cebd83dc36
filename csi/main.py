"""objfs-csi: the CSI plugin's entry point (flags, gRPC server, logging, shutdown)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from csi import params as P
from csi.errors import CsiError, from_store_error
from csi.node import broker as passthrough_broker
from csi.node import dataservice, metrics, podexit
from csi.node.launcher import ProcessLauncher, SidecarLauncher, default_server_command, drop_privileges
from csi.node.state import StateStore
from csi.services.controller import ControllerService
from csi.services.identity import DRIVER_NAME, IdentityService
from csi.services.node import NodeService
from csi.v1 import csi_pb2_grpc
from csi.webhook import server as webhook
from fusefs import errors as store_errors
from fusefs.config import ConfigError, parse_size
from fusefs.proc.service_process import ServiceProcess

log = logging.getLogger("objfs.csi")
# Called every few seconds by the CO and the sidecars: logged only at debug level when OK.
QUIET = frozenset({"Probe", "GetPluginInfo", "GetPluginCapabilities", "ControllerGetCapabilities",
                   "NodeGetCapabilities", "NodeGetInfo"})


def redact(request: Message) -> str:
    """The request on one line, without its secrets (values replaced, keys kept)."""
    copy = type(request)()
    copy.CopyFrom(request)
    secrets = getattr(copy, "secrets", None)
    if secrets is not None and len(secrets):
        keys = sorted(secrets)
        copy.ClearField("secrets")  # type: ignore[arg-type]
        for k in keys:
            copy.secrets[k] = "***"  # type: ignore[attr-defined]
    return text_format.MessageToString(copy, as_one_line=True)


class LoggingInterceptor(grpc.ServerInterceptor):
    """Logs and counts every call (secrets redacted) and turns our exceptions into gRPC statuses."""

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Message, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            log.debug("%s request: %s", method, redact(request))
            code, message = grpc.StatusCode.OK, ""
            try:
                return inner(request, context)
            except CsiError as e:
                code, message = e.code, e.message
            except store_errors.StoreError as e:
                err = from_store_error(e, method)
                code, message = err.code, err.message
            except NotImplementedError:
                # an RPC the plugin does not advertise (the generated servicer's default raises this):
                # UNIMPLEMENTED, which COs expect for it, not INTERNAL
                code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by objfs-csi"
            except Exception as e:
                log.exception("%s failed", method)
                code, message = grpc.StatusCode.INTERNAL, f"{method}: unexpected error: {e}"
            finally:
                took = (time.monotonic() - start) * 1000
                level = logging.INFO if code in (grpc.StatusCode.OK,) else logging.WARNING
                if method in QUIET and code == grpc.StatusCode.OK:
                    level = logging.DEBUG
                log.log(level, "%s %s in %.0f ms%s", method, code.name, took, f": {message}" if message else "")
                metrics.observe_rpc(method, code, took / 1000)
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def cache_size(text: str) -> int:
    """--cache-size: the size syntax of ``objfs mount --cache-size``, refused with the reason."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="objfs-csi", description="CSI driver exposing object storage as FUSE volumes")
    ap.add_argument("--endpoint", help="unix:///path/csi.sock (required but in --mode webhook)")
    ap.add_argument("--node-id", help="required but in --mode webhook")
    ap.add_argument("--mode", choices=("all", "controller", "node", "webhook"), default="all",
                    help="webhook: the admission webhook that adds the objfs sidecar to pods (csi/webhook/)")
    ap.add_argument("--state-dir", default="/var/lib/objfs/state")
    ap.add_argument("--cache-dir", default="/var/lib/objfs/cache", help="node cache shared by all servers")
    ap.add_argument("--cache-size", type=cache_size, default="10G", metavar="SIZE",
                    help="the node cache's size limit, e.g. 512M, 10G, 1T (binary units; 0: no node cache; "
                         "default: 10G)")
    ap.add_argument("--driver-name", default=DRIVER_NAME)
    ap.add_argument("--server-uid", type=int, default=65534, help="uid of the objfs serve processes")
    ap.add_argument("--server-gid", type=int, default=65534, help="gid of the objfs serve processes")
    ap.add_argument("--server-command", default=None, help="command that runs objfs (default: the installed one)")
    ap.add_argument("--data-uid", type=int, default=65532,
                    help="uid of the node's data service: owner of the node cache, the only holder of volumes' "
                         "credentials (never the servers' uid)")
    ap.add_argument("--data-gid", type=int, default=65532, help="gid of the node's data service")
    ap.add_argument("--grant-key-file", default="/run/objfs/grants.key",
                    help="key that encrypts the credentials in the plugin's grant records; keep it on tmpfs "
                         "(made if missing)")
    ap.add_argument("--no-zygote", action="store_true",
                    help="start every objfs serve as a fresh process instead of forking it from a pre-imported "
                         "objfs zygote (slower publishes; for debugging)")
    ap.add_argument("--allow-inline-node-identity", action="store_true",
                    help="let inline (ephemeral) volumes without a nodePublishSecretRef use the node's own cloud "
                         "identity (refused by default: any pod author could read what the node can)")
    ap.add_argument("--inline-buckets", default="*",
                    help="comma-separated globs of the buckets inline volumes may name (default: any)")
    ap.add_argument("--inline-endpoints", default="",
                    help="comma-separated endpoint URLs inline volumes may set, or '*' (default: none, so inline "
                         "volumes use the cloud's own endpoint)")
    ap.add_argument("--stats-timeout", type=float, default=10.0,
                    help="seconds NodeGetVolumeStats waits for a mount's statfs before reporting it abnormal")
    ap.add_argument("--launcher", choices=("process", "sidecar"), default="process",
                    help="who serves a published volume: an objfs serve started by this plugin (process), or the "
                         "objfs-sidecar container of the consuming pod (sidecar: servers live and die with their pod)")
    ap.add_argument("--kubelet-root", default="/var/lib/kubelet", help="kubelet's root dir (where pods' emptyDirs are)")
    ap.add_argument("--allow-process-fallback", action="store_true",
                    help="with --launcher sidecar: serve pods that have no objfs sidecar from this plugin instead of "
                         "refusing them with FailedPrecondition")
    ap.add_argument("--sidecar-wait", type=float, default=5.0,
                    help="seconds a publish waits for the pod's objfs-tmp emptyDir to appear (kubelet sets up a "
                         "pod's volumes side by side) before deciding the pod has no sidecar")
    ap.add_argument("--check-sidecar-cgroup", action="store_true",
                    help="with --launcher sidecar: hand a volume over only to a process in the pod's own cgroup "
                         "(needs the pods' PIDs visible to the plugin: hostPID; the socket is opened without "
                         "following links either way)")
    ap.add_argument("--handover-timeout", type=float, default=600.0,
                    help="seconds a published volume waits for its pod's sidecar to take it before giving up")
    ap.add_argument("--sidecar-exit-poll", type=float, default=10.0, metavar="SECONDS",
                    help="with --launcher sidecar: how often to look (Kubernetes API, pods get) at pods whose objfs "
                         "sidecar is a regular container (Kubernetes < 1.29) and, once their other containers are "
                         "done for good, tell it to finish its uploads and exit, so Jobs complete; 0: never")
    ap.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    ap.add_argument("--metrics-address", default="", metavar="HOST:PORT",
                    help="serve Prometheus metrics (the plugin's and every FUSE server's) on HOST:PORT/metrics; "
                         "default: off")
    ap.add_argument("--log-level", default=os.environ.get("OBJFS_LOG_LEVEL", "INFO"))
    webhook.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.mode != "webhook":
        missing = [f"--{k.replace('_', '-')}" for k in ("endpoint", "node_id") if not getattr(args, k)]
        if missing:
            ap.error(f"{' and '.join(missing)} required in --mode {args.mode}")
    return args


def data_uid_prefix(args: argparse.Namespace) -> list[str]:
    """How the data service becomes ``--data-uid``: like the servers, no groups, no capabilities."""
    try:
        return drop_privileges(args.data_uid, args.data_gid)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}: needed to run the data service as --data-uid {args.data_uid}") from None


def socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise SystemExit(f"--endpoint {endpoint!r}: only unix:///path endpoints are supported")
    path = endpoint[len("unix://") :]
    if not path.startswith("/"):
        raise SystemExit(f"--endpoint {endpoint!r}: use an absolute path: unix:///path/csi.sock")
    return path


def build_server(args: argparse.Namespace) -> tuple[grpc.Server, NodeService | None]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="csi"),
                         interceptors=[LoggingInterceptor()])
    # The identity service advertises a controller service; a node-only plugin still answers
    # ControllerGetCapabilities (csi-sanity and kubelet ask), so the controller is always served.
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(), server)
    node = None
    warmed = None
    if args.mode in ("all", "node"):
        if args.data_uid == args.server_uid and args.server_uid != 0:
            raise SystemExit("--data-uid must differ from --server-uid: the servers are the tenants'")
        dataservice.prepare_cache(args.cache_dir, args.data_uid, args.data_gid)
        state = StateStore(args.state_dir)
        launcher: ProcessLauncher | None = None
        if args.launcher == "process" or args.allow_process_fallback:
            launcher = ProcessLauncher(
                os.path.join(args.state_dir, "logs"), shlex.split(args.server_command) if args.server_command else None,
                uid=args.server_uid, gid=args.server_gid, zygote=not args.no_zygote,
            )
            # The zygote imports everything once (a second or so of CPU): do it before the first publish.
            threading.Thread(target=launcher.warm_up, name="zygote-warm-up", daemon=True).start()
            warmed = launcher.warmed
        sidecars = None
        # The data service registers complete node-cache files as FUSE passthrough backing files
        # through the broker (it lacks CAP_SYS_ADMIN), opened through a read-only mount of the
        # cache so that no open flags a server answers with can make the kernel write them.
        args.broker = None
        mirror = dataservice.readonly_mirror(args.cache_dir, os.path.join(args.state_dir, "cache-ro")) \
            if args.cache_size > 0 else None
        if mirror is not None:
            args.broker = passthrough_broker.start(os.path.join(args.state_dir, "broker"), mirror, args.data_uid)
        objfs = shlex.split(args.server_command) if args.server_command else default_server_command()
        args.data = ServiceProcess(
            [*data_uid_prefix(args), *objfs], args.cache_dir, args.cache_size,
            backing_root=mirror if args.broker is not None else None,
            broker_socket=args.broker.path if args.broker is not None else "",
            log_path=os.path.join(args.state_dir, "data-service.log"),
            metrics_path=dataservice.metrics_path(args.state_dir))
        dataservice.prepare_own_dir(args.state_dir, args.data_uid, args.data_gid)
        if args.launcher == "sidecar":
            sidecars = SidecarLauncher(args.kubelet_root, pod_wait=args.sidecar_wait,
                                       handover_timeout=args.handover_timeout,
                                       check_peer_cgroup=args.check_sidecar_cgroup)
        inline = P.InlinePolicy.from_flags(args.allow_inline_node_identity, args.inline_buckets,
                                           args.inline_endpoints)
        if inline.allow_node_identity and "*" in inline.buckets:
            log.warning("--allow-inline-node-identity with --inline-buckets '*': any pod can mount any bucket "
                        "this node's cloud identity can read")
        metrics_dir = metrics.prepare_metrics_dir(args.state_dir, args.server_uid, args.server_gid)
        node = NodeService(args.node_id, state, launcher, args.cache_dir, sidecars, data=args.data,
                           grants=dataservice.GrantRecords(args.state_dir, args.grant_key_file), inline=inline,
                           stats_timeout=args.stats_timeout, metrics_dir=metrics_dir, cache_size=args.cache_size)
        args.data.watch(node.regrant_all)
        if sidecars is not None:
            args.exit_watcher = podexit.start_watcher(args, node.sidecar_pods, sidecars.pod_dir)
        csi_pb2_grpc.add_NodeServicer_to_server(node, server)
    csi_pb2_grpc.add_IdentityServicer_to_server(
        IdentityService(args.driver_name, needs_fuse=args.mode != "controller", warmed=warmed), server
    )
    args.metrics = serve_metrics(args, node)
    return server, node


def serve_metrics(args: argparse.Namespace, node: NodeService | None) -> metrics.PluginMetrics | None:
    """``/metrics`` on --metrics-address, if given (its port in ``.port``)."""
    if not args.metrics_address:
        return None
    endpoint = metrics.PluginMetrics(
        args.kubelet_root, args.cache_dir if node else None, (lambda: len(node.state.all())) if node else None,
        args.cache_size, records=node.state.all if node else None,
        service_file=dataservice.metrics_path(args.state_dir) if node else "",
    )
    try:
        endpoint.serve(args.metrics_address)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"--metrics-address {args.metrics_address!r}: {exc}") from None
    log.info("serving metrics on %s:%d/metrics", args.metrics_address.rpartition(":")[0], endpoint.port)
    return endpoint


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    if args.mode == "webhook":
        return webhook.run(args)
    path = socket_path(args.endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a stale socket of an earlier life
    server, node = build_server(args)
    if node is not None:
        node.reconcile()
    server.add_insecure_port(f"unix://{path}")
    server.start()
    log.info("objfs-csi %s serving %s on %s (node %s)", args.driver_name, args.mode, path, args.node_id)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down (mounts keep being served)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop(grace=5).wait()
    data = getattr(args, "data", None)
    if data is not None:
        data.close()  # mounts keep being served: their servers wait for the next plugin's grants
    return 0


if __name__ == "__main__":
    sys.exit(main())
