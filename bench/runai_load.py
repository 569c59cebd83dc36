"""Load a safetensors model straight from S3 with runai-model-streamer (scenario 11, optional).

Run as a child process (``python -m bench.runai_load s3://bucket/key``) so the streamer's native
library and its S3 settings (from the environment the parent gives it) stay out of the harness.
Prints one JSON line: the seconds from the start of streaming to the last tensor, and the sha256
of every tensor's bytes, hashed after the clock stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time


def main() -> None:
    from runai_model_streamer import SafetensorsStreamer

    t0 = time.perf_counter()
    tensors = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(sys.argv[1])
        for name, tensor in streamer.get_tensors():
            tensors[name] = tensor
        secs = time.perf_counter() - t0
    hashes = {name: hashlib.sha256(t.numpy().tobytes()).hexdigest() for name, t in tensors.items()}
    print(json.dumps({"seconds": secs, "tensors": hashes}))


if __name__ == "__main__":
    main()
