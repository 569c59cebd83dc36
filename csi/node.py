"""CSI Node service: mount the target, launch ``objfs serve`` for it, and undo both.

The plugin itself does only the privileged part (open /dev/fuse, mount(2), umount(2)); the
server that talks to the store runs unprivileged (see ``launcher``). Every publish is recorded
on disk (see ``state``) so a restarted plugin can unpublish what an earlier one published.

A FUSE mount whose server died blocks or fails any stat of it: the target is never stat-ed
before mountinfo says what it is, and the only stat of a live mount (statvfs for the volume
stats) runs in a helper thread with a timeout, at most one per target (``statfs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
from collections.abc import Mapping

import grpc

from fusefs import kernel
from fusefs.config import MountConfig

from . import metrics
from . import params as P
from . import volume_id as V
from .errors import AlreadyExists, Internal, InvalidArgument, NotFound
from .launcher import Launcher, ServerHandle, ServerStartError
from .state import KeyedLocks, PublishRecord, StateStore
from .statfs import StatfsProbes
from .v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)
STATFS_TIMEOUT = 10.0
SUPPORTED_MOUNT_FLAGS = ("ro",)


def check_path(path: str, field: str) -> str:
    """An absolute path without '..' segments, normalized; InvalidArgument otherwise."""
    if not path:
        raise InvalidArgument(f"{field} is required")
    if "\0" in path or not os.path.isabs(path) or ".." in path.split("/"):
        raise InvalidArgument(f"{field} {path!r} must be an absolute path without '..' segments")
    return os.path.normpath(path)


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, state: StateStore, launcher: Launcher, cache_dir: str | None, *,
                 inline: P.InlinePolicy | None = None, stats_timeout: float = STATFS_TIMEOUT,
                 metrics_dir: str | None = None) -> None:
        self.node_id = node_id
        self.metrics_dir = metrics_dir  # servers write their figures here (csi.metrics)
        self.state = state
        self.launcher = launcher
        self.cache_dir = cache_dir
        self.locks = KeyedLocks()
        self.inline = inline or P.InlinePolicy()
        self.statfs = StatfsProbes(stats_timeout)

    # -- start-up ----------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Adopt the mounts whose server still runs; clean up the ones whose server died."""
        for rec in self.state.all():
            handle = _handle(rec)
            alive = self.launcher.alive(handle)
            mounted = kernel.find_mount(rec.target) is not None
            if alive and mounted:
                log.info("adopting %s (volume %s, server pid %d)", rec.target, rec.volume_id, rec.pid)
                continue
            log.warning("cleaning up %s: server %s, %s", rec.target, "alive" if alive else "dead",
                        "mounted" if mounted else "not mounted")
            self._teardown(rec.target, rec, lazy=True)

    # -- publish -----------------------------------------------------------------------------
    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
                          ) -> csi_pb2.NodePublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        target = check_path(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        mode = P.check_capability(request.volume_capability)
        mount = request.volume_capability.mount
        bad_flags = [f for f in mount.mount_flags if f not in SUPPORTED_MOUNT_FLAGS]
        if bad_flags:
            raise InvalidArgument(f"mount flags {', '.join(bad_flags)} are not supported (only: ro)")
        read_only = request.readonly or P.is_reader_only(mode) or "ro" in mount.mount_flags
        group = mount.volume_mount_group
        if group and not group.isdigit():
            raise InvalidArgument(f"volume_mount_group {group!r} must be a numeric gid")
        p = self._params(request.volume_id, request.volume_context)
        config = P.mount_config(p, request.secrets, read_only=read_only, cache_dir=self.cache_dir,
                                gid_override=int(group) if group else None)
        if P.is_inline(request.volume_context):
            self.inline.check(p, config.credentials)
        fingerprint = _fingerprint(request.volume_id, mode, read_only, request.volume_context, config.redacted())
        config = self._with_metrics(config, request.volume_id, target, request.volume_context)

        with self.locks.hold(target):
            rec = self.state.get(target)
            if rec is not None:
                if rec.fingerprint != fingerprint:
                    raise AlreadyExists(
                        f"{target} is already published with volume {rec.volume_id} and other options: "
                        "unpublish it first"
                    )
                if self.launcher.alive(_handle(rec)) and kernel.find_mount(target) is not None:
                    return csi_pb2.NodePublishVolumeResponse()
                log.warning("republishing %s: its server or mount is gone", target)
                self._teardown(target, rec, lazy=True, remove_dir=False)
            elif kernel.find_mount(target) is not None:
                raise AlreadyExists(f"something else is mounted at {target}: unpublish or unmount it first")
            handle = self._mount_and_serve(target, config, read_only)
            self.state.put(PublishRecord(
                volume_id=request.volume_id, target=target, pid=handle.pid, start_time=handle.start_time,
                read_only=read_only, fingerprint=fingerprint, config=config.redacted(), log_path=handle.log_path,
            ))
        log.info("published %s at %s (%s, server pid %d)", request.volume_id, target,
                 "ro" if read_only else "rw", handle.pid)
        return csi_pb2.NodePublishVolumeResponse()

    @staticmethod
    def _params(volume_id: str, context: Mapping[str, str]) -> P.VolumeParams:
        """Static and inline volumes name their bucket in the attributes; dynamic ones in the ID."""
        p = P.parse(context)
        if p.bucket or P.is_inline(context):
            if not p.bucket:
                raise InvalidArgument("inline volume attributes need 'bucket'")
            return p
        try:
            vid = V.parse(volume_id)
        except V.MalformedVolumeId:
            raise NotFound(
                f"volume {volume_id!r} is not an objfs volume ID and its attributes name no 'bucket'"
            ) from None
        return P.VolumeParams(
            backend=vid.backend, bucket=vid.bucket, prefix=vid.prefix, endpoint=vid.endpoint, region=vid.region,
            cache=p.cache, metadata_ttl=p.metadata_ttl, uid=p.uid, gid=p.gid, file_mode=p.file_mode,
            dir_mode=p.dir_mode, prefetch=p.prefetch,
        )

    def _mount_and_serve(self, target: str, config: MountConfig, read_only: bool) -> ServerHandle:
        created = False
        try:
            os.mkdir(target, 0o750)
            created = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(target, 0o750)
            created = True
        try:
            fd = kernel.mount_fuse(target, read_only=read_only, allow_other=True)
        except OSError as e:
            if created:
                os.rmdir(target)
            raise Internal(f"mounting {target} failed: {e.strerror}") from None
        try:
            kernel.set_readahead(target, config.tuning.readahead_kb)
            return self.launcher.start(config, fd, _server_name(target))
        except BaseException as e:
            with contextlib.suppress(OSError):
                kernel.unmount(target, lazy=True)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(target)
            if isinstance(e, ServerStartError):
                raise Internal(f"objfs serve could not serve {config.source}: {e}") from None
            raise
        finally:
            os.close(fd)  # the server holds its copy; ours would keep a dead server's mount hanging

    def _metrics_file(self, target: str) -> str:
        return os.path.join(self.metrics_dir, _server_name(target) + ".prom") if self.metrics_dir else ""

    def _with_metrics(self, config: MountConfig, volume_id: str, target: str, context: Mapping[str, str]
                      ) -> MountConfig:
        """Where the server writes its figures, and their labels: the volume, the pod if known."""
        ns, pod = context.get("csi.storage.k8s.io/pod.namespace", ""), context.get("csi.storage.k8s.io/pod.name", "")
        return dataclasses.replace(config, metrics_path=self._metrics_file(target), metrics_volume=volume_id,
                                   metrics_pod=f"{ns}/{pod}" if pod else "")

    # -- unpublish ---------------------------------------------------------------------------
    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        target = check_path(request.target_path, "target_path")
        with self.locks.hold(target):
            self._teardown(target, self.state.get(target), lazy=False)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _teardown(self, target: str, rec: PublishRecord | None, *, lazy: bool, remove_dir: bool = True) -> None:
        for _ in range(8):  # a crash between two publishes can leave mounts stacked
            m = kernel.find_mount(target)
            if m is None or (rec is None and not m.fstype.startswith("fuse")):
                break
            try:
                kernel.unmount(target, lazy=lazy)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    break
                log.warning("unmount of %s: %s; detaching it lazily", target, e.strerror)
                kernel.unmount(target, lazy=True)
        if rec is not None:
            self.launcher.stop(_handle(rec))
        if remove_dir and kernel.find_mount(target) is None:
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise Internal(f"cannot remove {target}: {e.strerror}") from None
        if rec is not None:
            self.state.delete(target)
            with contextlib.suppress(OSError):
                os.unlink(self._metrics_file(target))
            if rec.log_path:
                with contextlib.suppress(OSError):
                    os.unlink(rec.log_path)

    # -- stats and info ----------------------------------------------------------------------
    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
                           ) -> csi_pb2.NodeGetVolumeStatsResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        path = os.path.normpath(request.volume_path)
        rec = self.state.get(path)
        if rec is None or rec.volume_id != request.volume_id:
            raise NotFound(f"volume {request.volume_id} is not published at {request.volume_path}")
        cond = csi_pb2.VolumeCondition
        dead = f"the objfs server of this volume (pid {rec.pid}) is not running: the pod must be restarted"
        if not self.launcher.alive(_handle(rec)):
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=cond(abnormal=True, message=dead))
        if kernel.find_mount(path) is None:
            msg = f"{path} is no longer mounted"
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=cond(abnormal=True, message=msg))
        try:
            st = self.statfs.statvfs(path)
        except OSError as e:
            # ENOTCONN/ECONNABORTED: the server is gone (perhaps exiting right now).
            msg = dead if not self.launcher.alive(_handle(rec)) else f"statfs of {path} failed: {e.strerror}"
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=cond(abnormal=True, message=msg))
        if st is None:
            msg = (f"the objfs server of this volume has not answered statfs for {self.statfs.stuck_for(path):.0f}s "
                   "(stopped or stuck): reads from it hang; restart the pod if it does not recover")
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=cond(abnormal=True, message=msg))
        usage = csi_pb2.VolumeUsage
        problems = metrics.problems(self._metrics_file(path)) if self.metrics_dir else []
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                usage(unit=usage.BYTES, total=st.f_blocks * st.f_frsize, available=st.f_bavail * st.f_frsize,
                      used=(st.f_blocks - st.f_bfree) * st.f_frsize),
                usage(unit=usage.INODES, total=st.f_files, available=st.f_favail, used=st.f_files - st.f_ffree),
            ],
            volume_condition=cond(abnormal=bool(problems), message="; ".join(problems) or "serving"),
        )

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.NodeGetCapabilitiesResponse:
        rpc = csi_pb2.NodeServiceCapability.RPC
        types = (rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION, rpc.VOLUME_MOUNT_GROUP)
        caps = [csi_pb2.NodeServiceCapability(rpc=rpc(type=t)) for t in types]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id)


def _server_name(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:16]


def _handle(rec: PublishRecord) -> ServerHandle:
    return ServerHandle(rec.pid, rec.start_time, rec.log_path)


def _fingerprint(volume_id: str, mode: int, read_only: bool, context: Mapping[str, str], config: object) -> str:
    data = json.dumps([volume_id, mode, read_only, dict(context), config], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()
