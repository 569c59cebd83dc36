"""The node's data service: ``objfs data-service --control-fd N --cache-dir DIR ...`` (``fusefs.proc.cli``).

Started by the CSI node plugin (``csi/node/dataservice.py``) as a uid of its own that owns the node cache
(never the sidecars' 65534) and holds no capability. It is the only process on the node that holds
volumes' credentials (received over the control link, kept in memory only), the only client of the
stores for served volumes, and the only writer of the node cache. Grants and their connections
arrive over the control link (``fusefs.wire.control``); each connection is served by a
``fusefs.wire.grant.GrantServer`` with a ``LocalData`` scoped to its grant.

FUSE passthrough: a complete cached file is registered as a backing file by the plugin's broker
(``csi/node/broker.py``: CAP_SYS_ADMIN), with the /dev/fuse fd the sidecar sent in its hello and an fd
of the file opened through a read-only mount of the cache (``--backing-root``), so the kernel can
never reopen it for writing.

Runs until the control link closes: the plugin is gone, and its successor starts a new service.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from fusefs import buffers, metrics
from fusefs.config import MountConfig, Tuning
from fusefs.passthrough.backing import Registrar, SelfRegistrar, broker_registrar
from fusefs.retry import RetryPolicy
from fusefs.service.local import LocalData, open_cache
from fusefs.store import AsyncStore, open_store
from fusefs.wire import control
from fusefs.wire.fds import recv_with_fds
from fusefs.wire.grant import GrantServer

if TYPE_CHECKING:
    from fusefs.nodecache.cache import NodeCache

log = logging.getLogger("objfs.data-service")

BUFFERS_KEPT = 8  # idle block buffers the service keeps for the next GETs (8 x 8 MiB at most)


@dataclass
class _Grant:
    config: MountConfig
    store: AsyncStore
    connections: set[trio.CancelScope] = field(default_factory=set)


class DataService:
    def __init__(self, cache: NodeCache | None, registrar: Registrar | None,
                 backing_root: tuple[str, str] | None) -> None:
        self.cache = cache
        self.registrar = registrar
        self.backing_root = backing_root
        self.grants: dict[str, _Grant] = {}

    async def add(self, nursery: trio.Nursery, grant_id: str, config: MountConfig, conn: socket.socket) -> None:
        grant = self.grants.get(grant_id)
        if grant is None or grant.config != config:
            blocking = await trio.to_thread.run_sync(open_store, config)
            store = AsyncStore(blocking, config.tuning.max_concurrent_requests,
                               RetryPolicy(deadline=config.tuning.retry_deadline))
            old, grant = grant, _Grant(config, store)
            if old is not None:
                grant.connections = old.connections
            self.grants[grant_id] = grant
        nursery.start_soon(self._serve, grant_id, grant, conn)

    async def _serve(self, grant_id: str, grant: _Grant, conn: socket.socket) -> None:
        config = grant.config
        cache = self.cache if config.cache_dir and self.cache is not None else None

        async def make_data(fuse_fd: int | None) -> LocalData:
            return LocalData.for_config(
                config, grant.store, cache=cache, registrar=self.registrar if config.tuning.passthrough else None,
                fuse_fd=(lambda: fuse_fd) if fuse_fd is not None else None, backing_root=self.backing_root)

        with trio.CancelScope() as scope:
            grant.connections.add(scope)
            try:
                await GrantServer(conn, make_data).serve()
            finally:
                grant.connections.discard(scope)
        log.debug("a connection of grant %s ended", grant_id)

    def revoke(self, grant_id: str) -> None:
        grant = self.grants.pop(grant_id, None)
        if grant is not None:
            for scope in list(grant.connections):
                scope.cancel()

    async def run(self, link: socket.socket) -> None:
        link.setblocking(False)
        sock = trio.socket.from_stdlib_socket(link)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, fds = await recv_with_fds(sock, control.MAX_MESSAGE, 1)
                except OSError as exc:
                    log.info("control link: %s", exc)
                    break
                if not data:
                    break  # the plugin is gone
                answer: dict[str, object] = {"ok": True}
                try:
                    op, grant_id, config, fd = control.parse(data, fds)
                    if op == "grant":
                        assert config is not None and fd is not None
                        conn = socket.socket(fileno=fd)
                        try:
                            await self.add(nursery, grant_id, config, conn)
                        except Exception:
                            conn.close()
                            raise
                    elif op == "revoke":
                        self.revoke(grant_id)
                except Exception as exc:  # one bad grant must not stop the service
                    log.warning("control request refused: %s", exc)
                    answer = {"ok": False, "error": str(exc)[:500]}
                await sock.send(_json(answer))
            nursery.cancel_scope.cancel()


def _json(obj: object) -> bytes:
    import json

    return json.dumps(obj).encode()


async def _main(args: argparse.Namespace) -> None:
    os.umask(0o077)  # the cache is this uid's alone (the broker, root, opens what it registers)
    buffers.limit_malloc_retention()
    # Blocks are sent and dropped: their buffers are taken again by the next GETs (fusefs.buffers),
    # instead of a fresh 8 MiB allocation each (a fifth of the service's time in a cold read here).
    buffers.configure(Tuning().block_size, keep=BUFFERS_KEPT)
    cache = await trio.to_thread.run_sync(open_cache, args.cache_dir, args.cache_size)
    # The node cache's figures, which the servers no longer have, for the node plugin to re-export
    # (store requests are each server's own: it counts what it asked for, by volume).
    exporter = metrics.MountExporter({}, args.metrics_path, process_figures=False)
    if cache is not None:
        exporter.watch_cache(cache)
    registrar: Registrar | None = None
    if args.broker_socket:
        registrar = broker_registrar(args.broker_socket)
    elif args.self_register:
        registrar = SelfRegistrar()  # objfs mount as root: one trust domain
    backing_root = (args.cache_dir, args.backing_root) if args.backing_root else None
    service = DataService(cache, registrar, backing_root)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exporter.run)
            await service.run(socket.socket(fileno=args.control_fd))
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(exporter.close)
        if cache is not None:
            await trio.to_thread.run_sync(cache.close)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("botocore").setLevel(logging.WARNING)
    trio.run(_main, args)
    return 0
