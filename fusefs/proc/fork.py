"""Forked servers: what ``objfs zygote`` and ``objfs sidecar`` share. Both import everything a
server needs once (``preload``) and fork one child per server, which must leave through
``run_child`` (never return into its parent's loop)."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def preload() -> None:
    """Import what every server needs. No store SDK: servers forked here (and a pod's sidecar) get
    their data through the node's data service, and every pod would pay boto3's memory for nothing."""
    from fusefs.proc import serve  # noqa: F401  (pyfuse3, trio, the operations, the grant client)


def run_child(body: Callable[[], int]) -> NoReturn:
    """The end of a forked child: run ``body`` and leave with its status, whatever happens (a
    forked child must never return into its parent's loop, nor run its parent's exit handlers)."""
    rc = 1
    try:
        rc = body()
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)
