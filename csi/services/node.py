"""CSI Node service: mount the target, have it served, and undo both.

The plugin itself does only the privileged part (open /dev/fuse, mount(2), umount(2)); the FUSE
server runs unprivileged (see ``launcher``): in the consuming pod's ``objfs sidecar``
(``--launcher sidecar``) or as an ``objfs serve`` the plugin starts (``--launcher process``, and
the fallback for pods without a sidecar). Either gets its volume's data only through a grant
connection to the node's data service (``dataservice``): the credentials and the node cache never
leave the node's side (../shared/DESIGN.md, "Trust boundary"). Every publish is recorded on disk
(see ``state``) before anything is mounted, so a restarted plugin can finish or undo a half-done
publish, unpublish what an earlier one published, and hand every live server a new grant
connection (grants are recorded with their credentials encrypted: ``dataservice.GrantRecords``).

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
import re
import socket
from collections.abc import Mapping

import grpc

from csi import params as P
from csi import volume_id as V
from csi.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from csi.node import metrics
from csi.node.dataservice import GrantRecords, grant_id
from csi.node.launcher import (
    NO_SIDECAR,
    POD_UID_KEY,
    Launcher,
    ProcessLauncher,
    ServerHandle,
    ServerStartError,
    SidecarLauncher,
)
from csi.node.podexit import PodRef
from csi.node.state import FAILED, MOUNTING, PENDING, PROCESS, SERVED, SIDECAR, KeyedLocks, PublishRecord, StateStore
from csi.node.statfs import StatfsProbes
from csi.services import snapshots as S
from csi.v1 import csi_pb2, csi_pb2_grpc
from fusefs import kernel
from fusefs.config import DEFAULT_CACHE_SIZE, MountConfig
from fusefs.proc.service_process import ServiceProcess
from fusefs.wire import handoff
from fusefs.wire.control import ControlError

log = logging.getLogger(__name__)
STATFS_TIMEOUT = 10.0
SUPPORTED_MOUNT_FLAGS = ("ro",)
POD_NAMESPACE_KEY, POD_NAME_KEY = "csi.storage.k8s.io/pod.namespace", "csi.storage.k8s.io/pod.name"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def check_path(path: str, field: str) -> str:
    """An absolute path without '..' segments, normalized; InvalidArgument otherwise."""
    if not path:
        raise InvalidArgument(f"{field} is required")
    if "\0" in path or not os.path.isabs(path) or ".." in path.split("/"):
        raise InvalidArgument(f"{field} {path!r} must be an absolute path without '..' segments")
    return os.path.normpath(path)


def no_sidecar_message(context: Mapping[str, str], pod_uid: str) -> str:
    pod = "/".join(filter(None, (context.get(POD_NAMESPACE_KEY), context.get(POD_NAME_KEY)))) or pod_uid or "this pod"
    return (f"pod {pod} mounts objfs volumes but has no objfs sidecar (no objfs-tmp emptyDir): annotate the pod "
            'with objfs.csi.dev/inject: "true" and install the objfs admission webhook (deploy/), which adds it; '
            "or run the node plugin with --allow-process-fallback to serve such pods from the plugin")


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, state: StateStore, launcher: Launcher | None, cache_dir: str | None,
                 sidecars: SidecarLauncher | None = None, *, data: ServiceProcess, grants: GrantRecords,
                 inline: P.InlinePolicy | None = None, stats_timeout: float = STATFS_TIMEOUT,
                 metrics_dir: str | None = None, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.node_id = node_id
        self.data = data  # the node's data service: every server's store and node cache
        self.grants = grants
        self.cache_size = cache_size  # every server opens the shared node cache with this limit
        self.metrics_dir = metrics_dir  # servers write their figures here (csi.node.metrics)
        self.state = state
        self.launcher = launcher  # process launcher: the default, or the fallback next to sidecars
        self.sidecars = sidecars
        self.cache_dir = cache_dir
        self.locks = KeyedLocks()
        self.inline = inline or P.InlinePolicy()
        self.statfs = StatfsProbes(stats_timeout)

    # -- start-up ----------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Adopt what still serves, finish or undo half-done publishes, clean up the rest."""
        self.state.remove_leftovers()
        self.grants.remove_leftovers()
        for rec in self.state.all():
            if rec.phase in (MOUNTING, FAILED):
                # MOUNTING: kubelet never got an answer and will publish again; FAILED: dead anyway.
                log.warning("undoing the half-done publish of %s (%s)", rec.target, rec.phase)
                self._teardown(rec.target, rec, lazy=True, remove_dir=rec.phase == MOUNTING)
                continue
            if rec.launcher == SIDECAR:
                self._reconcile_sidecar(rec)
                continue
            handle = _handle(rec)
            alive = self.launcher is not None and self.launcher.alive(handle)
            mounted = kernel.find_mount(rec.target) is not None
            if alive and mounted:
                log.info("adopting %s (volume %s, server pid %d)", rec.target, rec.volume_id, rec.pid)
                self._regrant(rec)
                continue
            log.warning("cleaning up %s: server %s, %s", rec.target, "alive" if alive else "dead",
                        "mounted" if mounted else "not mounted")
            self._teardown(rec.target, rec, lazy=True)

    def _reconcile_sidecar(self, rec: PublishRecord) -> None:
        if kernel.find_mount(rec.target) is None:
            log.warning("forgetting %s: no longer mounted", rec.target)
            self._teardown(rec.target, rec, lazy=True)
            return
        if rec.phase == SERVED:
            log.info("adopting %s (volume %s, served by the sidecar of pod %s)", rec.target, rec.volume_id, rec.pod_uid)
            self._regrant(rec)
            return
        # PENDING: kubelet was told OK, and the fd died with the last plugin. Unless the sidecar
        # took it just before, no server ever had it: mount the target afresh and wait again.
        if self.sidecars is not None and self.sidecars.status(rec.pod_uid, rec.name) == handoff.SERVING:
            log.info("adopting %s: the sidecar took it just before the last plugin stopped", rec.target)
            self.state.put(dataclasses.replace(rec, phase=SERVED))
            self._regrant(rec)
            return
        config = self.grants.get(rec.target)
        if self.sidecars is None or config is None or not os.path.isdir(self.sidecars.pod_dir(rec.pod_uid)):
            why = "its pod is gone" if config is not None else "its grant record is lost"
            log.warning("cannot finish the hand-over of %s (%s): cleaning it up", rec.target, why)
            self._teardown(rec.target, rec, lazy=True)
            return
        log.warning("mounting %s afresh: its hand-over to the sidecar of pod %s was pending", rec.target, rec.pod_uid)
        self._unmount(rec.target, rec, lazy=True)
        try:
            self._mount_for_sidecar(rec, config)
        except Exception as exc:  # one target must not keep the plugin from starting
            log.error("cannot mount %s afresh: %s", rec.target, exc)

    def _regrant(self, rec: PublishRecord) -> bool:
        """Hand a live server its next grant connection (the data service it had is gone)."""
        config = self.grants.get(rec.target)
        if config is None:
            log.warning("%s: no grant record: its server's store requests fail until the pod restarts", rec.target)
            return False
        try:
            conn = self.data.grant(grant_id(rec.target), config)
        except ControlError as exc:
            log.error("%s: the data service refused its grant again: %s", rec.target, exc)
            return False
        with conn:
            if rec.launcher == SIDECAR:
                return self.sidecars is not None and self.sidecars.regrant(rec.pod_uid, rec.name, conn)
            return self.launcher is not None and self.launcher.regrant(_server_name(rec.target), conn)

    def regrant_all(self) -> None:
        """Every live server gets a new grant connection (the data service was restarted)."""
        for rec in self.state.all():
            if rec.phase == SERVED:
                self._regrant(rec)

    def sidecar_pods(self) -> list[PodRef]:
        """The pods whose sidecars this plugin hands volumes to (for ``podexit``)."""
        return [PodRef(r.pod_namespace, r.pod_name, r.pod_uid) for r in self.state.all() if r.launcher == SIDECAR]

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
        snapshot = _snapshot_manifest(request.volume_id, p)
        read_only = read_only or bool(snapshot)  # a snapshot's volume is read-only whatever the pod says
        config = P.mount_config(p, request.secrets, read_only=read_only, cache_dir=self.cache_dir,
                                cache_size=self.cache_size, gid_override=int(group) if group else None)
        if snapshot:
            config = dataclasses.replace(config, snapshot=snapshot)
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
                if self._still_published(rec):
                    return csi_pb2.NodePublishVolumeResponse()
                log.warning("republishing %s: its server or mount is gone (%s)", target, rec.phase)
                self._teardown(target, rec, lazy=True, remove_dir=False)
            elif kernel.find_mount(target) is not None:
                raise AlreadyExists(f"something else is mounted at {target}: unpublish or unmount it first")
            rec = PublishRecord(volume_id=request.volume_id, target=target, pid=0, start_time=0, read_only=read_only,
                                fingerprint=fingerprint, config=config.redacted(), phase=MOUNTING)
            pod_uid = request.volume_context.get(POD_UID_KEY, "")
            if self.sidecars is not None and self._has_sidecar(pod_uid):
                rec = dataclasses.replace(rec, launcher=SIDECAR, pod_uid=pod_uid, name=volume_name(target),
                                          pod_namespace=request.volume_context.get(POD_NAMESPACE_KEY, ""),
                                          pod_name=request.volume_context.get(POD_NAME_KEY, ""))
                self.state.put(rec)  # the intent, before anything is mounted
                phase = self._mount_for_sidecar(rec, config)
                log.info("published %s at %s (%s, %s)", request.volume_id, target, "ro" if read_only else "rw",
                         "served by the pod's sidecar" if phase == SERVED else "waiting for the pod's sidecar")
                return csi_pb2.NodePublishVolumeResponse()
            if self.launcher is None:
                raise FailedPrecondition(no_sidecar_message(request.volume_context, pod_uid))
            rec = dataclasses.replace(rec, log_path=self._log_path(target))
            self.state.put(rec)  # the intent, before anything is mounted
            handle = self._mount_and_serve(target, config, rec)
            self.state.put(dataclasses.replace(rec, pid=handle.pid, start_time=handle.start_time, phase=SERVED))
        log.info("published %s at %s (%s, server pid %d)", request.volume_id, target,
                 "ro" if read_only else "rw", handle.pid)
        return csi_pb2.NodePublishVolumeResponse()

    def _still_published(self, rec: PublishRecord) -> bool:
        """A repeat of a publish that still holds: answered OK at once (kubelet republishes)."""
        if rec.phase not in (SERVED, PENDING) or kernel.find_mount(rec.target) is None:
            return False
        if rec.launcher == SIDECAR:
            # Served: the pod's containers hold this very mount, a new one would not reach them.
            return rec.phase == SERVED or (self.sidecars is not None and self.sidecars.is_pending(rec.target))
        return self.launcher is not None and self.launcher.alive(_handle(rec))

    def _has_sidecar(self, pod_uid: str) -> bool:
        assert self.sidecars is not None
        return bool(pod_uid) and self.sidecars.has_sidecar_dir(pod_uid)

    def _log_path(self, target: str) -> str:
        if not isinstance(self.launcher, ProcessLauncher):
            return ""
        return self.launcher.log_path(_server_name(target))

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
        # A read-only volume of a snapshot shows the snapshot's objects under its data folder.
        prefix = vid.snapshot_folder + S.DATA if vid.kind == V.KIND_SNAPSHOT else vid.prefix
        return P.VolumeParams(
            backend=vid.backend, bucket=vid.bucket, prefix=prefix, endpoint=vid.endpoint, region=vid.region,
            cache=p.cache, metadata_ttl=p.metadata_ttl, uid=p.uid, gid=p.gid, file_mode=p.file_mode,
            dir_mode=p.dir_mode, prefetch=p.prefetch, file_metadata=p.file_metadata,
        )

    def _mount_target(self, target: str, read_only: bool) -> tuple[int, bool]:
        """mkdir (if needed) and mount(2) the target: (the /dev/fuse fd, whether we made the dir)."""
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
            return kernel.mount_fuse(target, read_only=read_only, allow_other=True), created
        except OSError as e:
            if created:
                os.rmdir(target)
            raise Internal(f"mounting {target} failed: {e.strerror}") from None

    def _undo_mount(self, target: str, created: bool) -> None:
        with contextlib.suppress(OSError):
            kernel.unmount(target, lazy=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(target)

    def _grant(self, target: str, config: MountConfig) -> socket.socket:
        """Record the grant (credentials encrypted) and open its first connection."""
        self.grants.put(target, config)
        try:
            return self.data.grant(grant_id(target), config)
        except ControlError as exc:
            self.grants.delete(target)
            raise Internal(f"the node's data service cannot serve {config.source}: {exc}") from None

    def _mount_and_serve(self, target: str, config: MountConfig, rec: PublishRecord) -> ServerHandle:
        assert self.launcher is not None
        fd, created = self._mount_target(target, rec.read_only)
        grant: socket.socket | None = None
        try:
            grant = self._grant(target, config)
            handle = self.launcher.start(config.server_view(), fd, _server_name(target), grant)
            # After FUSE INIT, which caps it: set before, the kernel would lower it again.
            kernel.raise_readahead_soon(target, config.tuning.readahead_kb)
            return handle
        except BaseException as e:
            self._undo_mount(target, created)
            self._forget_grant(target)
            self.state.delete(target)
            if isinstance(e, ServerStartError):
                raise Internal(f"objfs serve could not serve {config.source}: {e}") from None
            raise
        finally:
            os.close(fd)  # the server holds its copy; ours would keep a dead server's mount hanging
            if grant is not None:
                grant.close()  # likewise: the server holds its end of the grant connection

    def _metrics_file(self, target: str) -> str:
        return os.path.join(self.metrics_dir, _server_name(target) + ".prom") if self.metrics_dir else ""

    def _with_metrics(self, config: MountConfig, volume_id: str, target: str, context: Mapping[str, str]
                      ) -> MountConfig:
        """Where the server writes its figures, and their labels: the volume, the pod if known."""
        ns, pod = context.get(POD_NAMESPACE_KEY, ""), context.get(POD_NAME_KEY, "")
        return dataclasses.replace(config, metrics_path=self._metrics_file(target), metrics_volume=volume_id,
                                   metrics_pod=f"{ns}/{pod}" if pod else "")

    def _mount_for_sidecar(self, rec: PublishRecord, config: MountConfig) -> str:
        """Mount the target and hand it to the pod's sidecar (now, or once it listens): the phase."""
        assert self.sidecars is not None
        fd, created = self._mount_target(rec.target, rec.read_only)
        try:
            # Pending until the sidecar has it: a restarted plugin mounts it again from the grant record.
            grant = self._grant(rec.target, config)
            self.state.put(dataclasses.replace(rec, phase=PENDING))
            served = self.sidecars.publish(rec.target, rec.name, rec.pod_uid, config.server_view(), fd, grant,
                                           self._handed_over, config.tuning.readahead_kb)
        except BaseException as e:
            self._undo_mount(rec.target, created)
            self._forget_grant(rec.target)
            self.state.delete(rec.target)
            if isinstance(e, ServerStartError):
                raise Internal(f"the pod's objfs sidecar could not serve {config.source}: {e}") from None
            raise
        finally:
            os.close(fd)  # handed over, or a pending hand-over holds its own copy
        if served:
            self._handed_over(rec.target, None)
            return SERVED
        return PENDING

    def _handed_over(self, target: str, error: str | None) -> None:
        """The outcome of a hand-over (called by the sidecar launcher; never for a cancelled one)."""
        rec = self.state.get(target)
        if rec is None:
            return
        if error is None:
            self.state.put(dataclasses.replace(rec, phase=SERVED, message=""))
        else:
            self.state.put(dataclasses.replace(rec, phase=FAILED, message=error))

    def _forget_grant(self, target: str) -> None:
        """The volume's grant is over: its connections closed, its record (and secret) gone."""
        self.data.revoke(grant_id(target))
        self.grants.delete(target)

    # -- unpublish ---------------------------------------------------------------------------
    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        target = check_path(request.target_path, "target_path")
        with self.locks.hold(target):
            self._teardown(target, self.state.get(target), lazy=False)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _unmount(self, target: str, rec: PublishRecord | None, *, lazy: bool) -> None:
        if self.sidecars is not None:
            self.sidecars.cancel(target)  # a pending hand-over: its fd is closed, its outcome ignored
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

    def _teardown(self, target: str, rec: PublishRecord | None, *, lazy: bool, remove_dir: bool = True) -> None:
        self._unmount(target, rec, lazy=lazy)
        if rec is not None and rec.launcher == PROCESS and rec.pid and self.launcher is not None:
            self.launcher.stop(_handle(rec))  # a sidecar's server ends by itself once unmounted
        if remove_dir and kernel.find_mount(target) is None:
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise Internal(f"cannot remove {target}: {e.strerror}") from None
        self._forget_grant(target)
        # The files named after the target go before the record: a plugin killed in between must
        # not leave them behind, and a retried unpublish (no record left) still finds them by name.
        channel = self.launcher.channel_path(_server_name(target)) if isinstance(self.launcher, ProcessLauncher) else ""
        for path in {self._metrics_file(target), self._log_path(target), rec.log_path if rec else "", channel}:
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if rec is not None:
            self.state.delete(target)

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
        problem = self._server_problem(rec)
        if problem is not None:
            abnormal, msg = problem
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=cond(abnormal=abnormal, message=msg))
        if kernel.find_mount(path) is None:
            msg = f"{path} is no longer mounted"
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=cond(abnormal=True, message=msg))
        try:
            st = self.statfs.statvfs(path)
        except OSError as e:
            # ENOTCONN/ECONNABORTED: the server is gone (perhaps exiting right now).
            problem = self._server_problem(rec)
            msg = problem[1] if problem is not None else f"statfs of {path} failed: {e.strerror}"
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

    def _server_problem(self, rec: PublishRecord) -> tuple[bool, str] | None:
        """(abnormal, message) when the volume is not being served, else None."""
        if rec.launcher == PROCESS:
            if self.launcher is not None and self.launcher.alive(_handle(rec)):
                return None
            return True, f"the objfs server of this volume (pid {rec.pid}) is not running: the pod must be restarted"
        if rec.phase == PENDING:
            return False, "waiting for the pod's objfs-sidecar container to start and take the volume"
        if rec.phase == FAILED:
            return True, f"the pod's objfs sidecar could not serve this volume: {rec.message}; restart the pod"
        if self.sidecars is None:
            return True, "this volume is served by a pod's sidecar but the plugin runs without --launcher sidecar"
        status = self.sidecars.status(rec.pod_uid, rec.name)
        if status == handoff.SERVING:
            return None
        if status == NO_SIDECAR and os.path.exists(os.path.join(self.sidecars.pod_dir(rec.pod_uid), handoff.EXIT_FILE)):
            return False, "the pod's containers are done: its objfs-sidecar finished its uploads and exited as told"
        if status == NO_SIDECAR:
            return True, (f"the objfs-sidecar container of pod {rec.pod_uid} is not running (it exited or was "
                          "killed, e.g. OOM): reads fail with ENOTCONN; the pod must be restarted")
        return True, (f"the objfs server of volume {rec.name} in the sidecar of pod {rec.pod_uid} is not running "
                      f"({status}): the pod must be restarted")

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

def volume_name(target: str) -> str:
    """The volume's name in its pod: the PV (or inline volume) name in kubelet's target path
    ``.../volumes/kubernetes.io~csi/<name>/mount``, else a hash of the path."""
    name = os.path.basename(os.path.dirname(target))
    return name if _NAME_RE.match(name) else _server_name(target)


def _handle(rec: PublishRecord) -> ServerHandle:
    return ServerHandle(rec.pid, rec.start_time, rec.log_path)


def _snapshot_manifest(volume_id: str, p: P.VolumeParams) -> str:
    """The manifest key a read-only volume of a snapshot is served from; "" for other volumes."""
    try:
        vid = V.parse(volume_id)
    except V.MalformedVolumeId:
        return ""
    if vid.kind != V.KIND_SNAPSHOT or p.bucket != vid.bucket:
        return ""
    return vid.snapshot_folder + S.MANIFEST


def _fingerprint(volume_id: str, mode: int, read_only: bool, context: Mapping[str, str], config: object) -> str:
    data = json.dumps([volume_id, mode, read_only, dict(context), config], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()
