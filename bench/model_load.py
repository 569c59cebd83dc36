"""Load a safetensors model from a path in a child process (``python -m bench.model_load PATH``):
safetensors keeps the GIL across its mmap's page faults, which would stall the harness's own
threads (the counting proxy) while the model comes through them. Prints one JSON line: the
seconds of the load and the sha256 of every tensor's bytes, hashed after the clock stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time


def main() -> None:
    from safetensors import safe_open

    t0 = time.perf_counter()
    with safe_open(sys.argv[1], framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs,
                      "tensors": {k: hashlib.sha256(t.tobytes()).hexdigest() for k, t in tensors.items()}}))


if __name__ == "__main__":
    main()
