"""Run a local ``rclone serve s3`` for sanity/run.sh until SIGTERM.

Writes ``endpoint``, ``access_key`` and ``secret_key`` (one ``name=value`` a line, mode 0600)
to the file given as the second argument once the server listens.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.servers import RcloneS3


def main() -> int:
    root, info = Path(sys.argv[1]), sys.argv[2]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with RcloneS3(root) as server:
        fd = os.open(info + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"endpoint={server.endpoint}\naccess_key={server.access_key}\nsecret_key={server.secret_key}\n")
        os.rename(info + ".tmp", info)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
