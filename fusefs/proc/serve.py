"""Running one FUSE server for one MountConfig.

``serve()`` checks that the bucket answers (a bad endpoint fails in seconds, before anything is
mounted or reported ready), builds the store, node cache and operations, hands them to pyfuse3
(on a mount point, or on an already-mounted ``/dev/fd/N``), reports ready, and runs the loop until
the filesystem is unmounted or SIGTERM/SIGINT arrive.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import pyfuse3
import trio

from fusefs import buffers, errors, kernel, metrics
from fusefs.config import MountConfig
from fusefs.fs.ops import Operations
from fusefs.passthrough.backing import Passthrough, choose_registrar, fuse_fd, patched_pyfuse3
from fusefs.retry import RetryPolicy
from fusefs.service.api import DataClient
from fusefs.service.local import LocalData, open_cache
from fusefs.store import AsyncStore, open_store
from fusefs.store.base import ObjectInfo
from fusefs.wire import handoff
from fusefs.wire.grant import GrantClient
from fusefs.wire.regrant import receive_grants

if TYPE_CHECKING:
    from fusefs.nodecache.cache import NodeCache

log = logging.getLogger(__name__)

CHECK_DEADLINE = 10.0  # seconds the mount-time check is retried for
CHECK_TIMEOUT = 20.0  # seconds for the whole check, its retries included: a hung endpoint fails too
PREFETCH_PARALLEL = 4  # objects warmed at once by the `prefetch` globs
#: on SIGTERM, how long open files may still be written and closed (kubelet's default grace is 30 s)
STOP_WRITES_WAIT = 25.0


class MountError(Exception):
    """The mount cannot be served; the message is one line meant for the user."""


def fuse_options(config: MountConfig) -> set[str]:
    opts = {f"fsname={config.fs_name}", "subtype=objfs", "default_permissions"}
    if config.allow_other:
        opts.add("allow_other")
    if config.read_only:
        opts.add("ro")
    return opts


def check_policy(config: MountConfig) -> RetryPolicy:
    """The mount-time check retries like every request (one throttled or failed answer must not
    fail a pod's start), within a shorter deadline: a wrong endpoint still fails in seconds."""
    return RetryPolicy(deadline=min(CHECK_DEADLINE, config.tuning.retry_deadline))


async def check_store(store: AsyncStore | DataClient, policy: RetryPolicy, limit: float = CHECK_TIMEOUT) -> None:
    """Prove that the endpoint, bucket and credentials work (retried); MountError otherwise."""
    try:
        with trio.fail_after(limit):
            if isinstance(store, AsyncStore):
                await store.check_access(policy)
            else:
                await store.check_access()  # the data service retries with its own policy
    except trio.TooSlowError:
        raise MountError(f"the store did not answer within {limit:.0f}s: check --endpoint-url") from None
    except errors.StoreError as exc:
        raise MountError(str(exc)) from None


def open_local_data(config: MountConfig, store: AsyncStore) -> LocalData:
    """The data service in this process (a standalone mount: one trust domain), with the node
    cache and, where this build and privilege allow it, passthrough registration."""
    cache = open_cache(config.cache_dir, config.cache_size)
    registrar = None
    if cache is not None and config.tuning.passthrough and patched_pyfuse3():
        registrar, how = choose_registrar(config.broker_socket)
        if registrar is None:
            log.warning("FUSE passthrough off: %s; reading through the server", how)
    return LocalData.for_config(config, store, cache=cache, registrar=registrar, fuse_fd=fuse_fd)


def passthrough_for(config: MountConfig, data: DataClient) -> Passthrough | None:
    """FUSE passthrough for reads of complete node-cache files, when this build, the data service
    and privilege allow it; otherwise None, said once in the log."""
    if not data.node_cache:
        return None
    if not config.tuning.passthrough:
        log.info("FUSE passthrough off: turned off in the configuration; reading through the server")
        return None
    if not patched_pyfuse3():
        log.warning("FUSE passthrough off: this pyfuse3 has no passthrough API (needs the patched build "
                    "against libfuse >= 3.17); reading through the server")
        return None
    if not data.passthrough:
        log.warning("FUSE passthrough off: the data service cannot register backing files; "
                    "reading through the server")
        return None
    return Passthrough("backing files registered read-only by the data service")


def _exporter(config: MountConfig, data: DataClient, cache: NodeCache | None) -> metrics.MountExporter:
    """This mount's figures (fusefs.metrics); MountError for an address that cannot be served."""
    try:
        exporter = metrics.for_mount(config.metrics_volume or config.source, config.metrics_pod,
                                     config.metrics_path, config.metrics_address)
    except ValueError as exc:
        raise MountError(str(exc)) from None
    if cache is not None:
        exporter.watch_cache(cache)
    metrics.cache_disabled(data.cache_disabled)
    exporter.write_quietly()  # before ready: the plugin may ask for the volume's condition at once
    return exporter


async def _warm(ops: Operations, config: MountConfig) -> None:
    """Fetch objects matching the `prefetch` globs into the node cache, in the background."""
    if not config.prefetch or not ops.store.node_cache:
        return
    matches: list[ObjectInfo] = []
    token: str | None = None
    try:
        while True:
            page = await ops.store.list(config.prefix, None, token)
            for info in page.objects:
                rel = info.key[len(config.prefix):]
                if info.size and any(fnmatch.fnmatchcase(rel, g) for g in config.prefetch):
                    matches.append(info)
            token = page.next_token
            if not token:
                break
        limiter = trio.CapacityLimiter(PREFETCH_PARALLEL)

        async def warm_one(info: ObjectInfo) -> None:
            # Each object's failure stays its own: raised into the nursery, it came out as an
            # ExceptionGroup that the except below does not catch, and took the server down.
            async with limiter:
                try:
                    for index in range(ops.reader.block_count(info.size)):
                        await ops.reader.warm(info, index)
                except errors.StoreError as exc:
                    log.warning("prefetch of %s stopped: %s", info.key, exc)

        async with trio.open_nursery() as nursery:
            for info in matches:
                nursery.start_soon(warm_one, info)
        log.info("prefetched %d objects into the node cache", len(matches))
    except errors.StoreError as exc:
        log.warning("prefetch stopped: %s", exc)


async def _settle_writes(ops: Operations, limit: float) -> None:
    """Let open write handles close and their uploads finish (a pod's writer exits before the
    server is told to stop), for at most ``limit`` seconds."""
    with trio.move_on_after(limit):
        while ops.writes_pending:  # noqa: ASYNC110 (a few polls once, at stop: no event needed)
            await trio.sleep(0.05)
    if ops.writes_pending:
        log.error("stopping with writes still pending after %.0fs: their data is lost", limit)


async def _signals(cancel: trio.CancelScope, ops: Operations) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("signal %s: finishing uploads, then unmounting", sig)
            await _settle_writes(ops, STOP_WRITES_WAIT)
            pyfuse3.terminate()
            cancel.cancel()
            return


@contextlib.asynccontextmanager
async def open_data(config: MountConfig, grant: socket.socket | None, fuse_fd_number: int | None
                    ) -> AsyncIterator[tuple[DataClient, NodeCache | None]]:
    """The mount's data: over its grant connection (a pod's server: the node's data service holds
    the credentials and the cache), or served in this process (a standalone ``objfs mount``)."""
    if grant is not None:
        async with GrantClient(grant, fuse_fd_number) as client:
            await check_store(client, check_policy(config))
            yield client, None
        return
    # Building a client may resolve credentials (a credential process, an identity endpoint): off the loop.
    blocking = await trio.to_thread.run_sync(open_store, config)
    store = AsyncStore(blocking, config.tuning.max_concurrent_requests,
                       RetryPolicy(deadline=config.tuning.retry_deadline))
    await check_store(store, check_policy(config))
    local = open_local_data(config, store)
    try:
        yield local, local.cache
    finally:
        if local.cache is not None:
            await trio.to_thread.run_sync(local.cache.close)  # drains the cache's write queue


async def serve(
    config: MountConfig,
    mountpoint: str,
    ready: Callable[[], None] | None = None,
    unmount_target: str | None = None,
    grant: socket.socket | None = None,
    regrant: socket.socket | None = None,
) -> None:
    """Serve ``config`` on ``mountpoint`` (a directory, or ``/dev/fd/N`` already mounted).

    ``ready`` is called once the store answered and the loop is about to serve. ``unmount_target``
    is the real mount point of a ``/dev/fd/N`` mount, unmounted (lazily) on a signal. ``grant``:
    the connection to the node's data service for this volume (``fusefs.wire.grant``); ``regrant``:
    where a restarted node plugin hands over the next one (``fusefs.wire.regrant``).
    """
    os.umask(0o077)
    buffers.limit_malloc_retention()
    fuse_fd_number = int(mountpoint[len("/dev/fd/"):]) if mountpoint.startswith("/dev/fd/") else None
    async with open_data(config, grant, fuse_fd_number) as (data, cache), trio.open_nursery() as nursery:
        if regrant is not None and isinstance(data, GrantClient):
            nursery.start_soon(receive_grants, regrant, data.replace)
        await _serve_with(config, mountpoint, data, cache, ready, unmount_target)
        nursery.cancel_scope.cancel()


async def _serve_with(config: MountConfig, mountpoint: str, data: DataClient, cache: NodeCache | None,
                      ready: Callable[[], None] | None, unmount_target: str | None) -> None:
    exporter = _exporter(config, data, cache)
    # Blocks dropped by the reader are reused for the next ones (fusefs.buffers): a few suffice,
    # as a stream drops a block for every block it fetches.
    buffers.configure(data.block_size, keep=2)
    staging = tempfile.mkdtemp(prefix="objfs-staging-")
    initialized = False
    signalled = False
    try:
        async with trio.open_nursery() as nursery:
            ops = Operations(config, data, nursery, staging)
            exporter.watch_handles(lambda: len(ops._handles))
            nursery.start_soon(exporter.run)
            options = fuse_options(config)
            ops.passthrough = passthrough_for(config, data)
            if ops.passthrough is not None:
                options.add("passthrough")
            pyfuse3.init(ops, mountpoint, options)
            initialized = True
            if not mountpoint.startswith("/dev/fd/") and os.geteuid() == 0:
                kernel.raise_readahead_soon(mountpoint, config.tuning.readahead_kb)
            with trio.CancelScope() as loop_scope:
                nursery.start_soon(_signals, loop_scope, ops)
                nursery.start_soon(_warm, ops, config)
                if ready is not None:
                    ready()
                await pyfuse3.main()
            signalled = loop_scope.cancelled_caught or loop_scope.cancel_called
            nursery.cancel_scope.cancel()
    finally:
        if initialized:
            pyfuse3.close(unmount=True)
        if signalled and unmount_target:
            try:
                kernel.unmount(unmount_target, lazy=True)
            except OSError as exc:
                log.info("unmount of %s: %s", unmount_target, exc)
        await trio.to_thread.run_sync(exporter.close)  # the last figures
        await trio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))


def run(config: MountConfig, mountpoint: str, ready: Callable[[], None] | None = None,
        unmount_target: str | None = None, grant: socket.socket | None = None,
        regrant: socket.socket | None = None) -> None:
    try:
        trio.run(serve, config, mountpoint, ready, unmount_target, grant, regrant)
    except BaseExceptionGroup as group:  # the grant connection's nursery wraps what its body raised
        mount_error = group.subgroup(MountError)
        if mount_error is not None:
            raise errors.first_leaf(mount_error) from None
        raise


def serve_reporting(status: handoff.StatusReporter, who: str, config: MountConfig, mountpoint: str,
                    unmount_target: str | None = None, grant: socket.socket | None = None,
                    regrant: socket.socket | None = None) -> int:
    """Serve until unmounted, telling the launcher ``ready`` or the error on ``status``: the
    exit status of ``objfs serve`` and of each volume's child of ``objfs sidecar``."""
    try:
        run(config, mountpoint, status.ready, unmount_target, grant, regrant)
    except MountError as exc:
        status.error(str(exc))
        print(f"{who}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.exception("%s: server failed", who)
        status.error(str(exc))
        return 1
    return 0


def serve_fds(config_fd: int, fuse_fd: int | None, ready_fd: int | None, mountpoint_arg: str | None,
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
    grant = socket.socket(fileno=grant_fd) if grant_fd is not None else None
    regrant = socket.socket(fileno=regrant_fd) if regrant_fd is not None else None
    return serve_reporting(status, "objfs serve", config, mountpoint, unmount_target, grant, regrant)
