"""Deterministic benchmark data, written straight into the S3 server's data directory.

Writing files into ``rclone serve s3``'s directory before it starts is far faster than PUTs
(100,000 objects in seconds). Every object's sha256 is kept in a manifest, so the scenarios check
every byte they read against it. The manifest is reused while the sizes have not changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MiB = 1 << 20
GiB = 1 << 30
SMALL_FILE = 64 * 1024


@dataclass(frozen=True)
class Sizes:
    large: int  # scenarios 1, 2, 3, 6, 7, 8
    memory: int  # scenario 9
    model: int  # scenario 11 (approximate)
    small_files: int  # scenario 4
    many: int  # scenario 5
    reps: int  # repetitions of each measurement
    ttfb_reps: int
    publishes: int  # scenario 10
    latency_files: int  # scenarios 16-18: the first this many of the small files, through the latency proxy

    @staticmethod
    def named(name: str) -> Sizes:
        return {
            "full": Sizes(GiB, 2 * GiB, GiB, 4000, 100_000, 3, 5, 20, 2000),
            "small": Sizes(256 * MiB, 512 * MiB, 256 * MiB, 1000, 10_000, 2, 3, 20, 1000),
            "quick": Sizes(16 * MiB, 32 * MiB, 16 * MiB, 60, 300, 1, 1, 4, 60),
        }[name]


@dataclass
class Manifest:
    sizes: dict[str, int]
    objects: dict[str, str]  # key -> sha256 of its bytes
    small: list[str]  # keys of scenario 4's files (under small/)
    many: list[str]  # names of scenario 5's objects (under many/)
    tensors: dict[str, str]  # tensor name -> sha256 of its bytes

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> Manifest:
        return Manifest(**json.loads(path.read_text()))


LARGE_KEY = "large/object.bin"
MEMORY_KEY = "memory/object.bin"
MODEL_KEY = "model/model.safetensors"


def _random_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes (incompressible) and return their sha256."""
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.bytes(min(64 * MiB, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _model(path: Path, size: int, seed: int) -> dict[str, str]:
    """A safetensors file shaped like a transformer: big float16 matrices and small norm vectors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    hidden = 2048 if size >= 256 * MiB else 256
    matrix_bytes = hidden * hidden * 4 * 2  # (hidden, 4*hidden) float16
    tensors: dict[str, np.ndarray] = {}
    layer = 0
    while sum(t.nbytes for t in tensors.values()) + matrix_bytes <= size:
        raw = rng.bytes(matrix_bytes)
        tensors[f"layers.{layer}.mlp.weight"] = np.frombuffer(raw, dtype=np.float16).reshape(hidden, 4 * hidden)
        tensors[f"layers.{layer}.norm.weight"] = rng.standard_normal(hidden, dtype=np.float32)
        layer += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return {name: hashlib.sha256(t.tobytes()).hexdigest() for name, t in tensors.items()}


def generate(bucket_dir: Path, manifest_path: Path, sizes: Sizes, log: object = print) -> Manifest:
    """Create (or reuse) every data set of the benchmark under ``bucket_dir``."""
    wanted = {"large": sizes.large, "memory": sizes.memory, "model": sizes.model,
              "small_files": sizes.small_files, "many": sizes.many}
    if manifest_path.exists():
        old = Manifest.load(manifest_path)
        if old.sizes == wanted and all((bucket_dir / k).exists() for k in old.objects):
            return old
    shutil.rmtree(bucket_dir, ignore_errors=True)
    bucket_dir.mkdir(parents=True)
    say = log if callable(log) else print
    say(f"generating data in {bucket_dir} ...")
    objects: dict[str, str] = {}
    objects[LARGE_KEY] = _random_file(bucket_dir / LARGE_KEY, sizes.large, 1)
    objects[MEMORY_KEY] = _random_file(bucket_dir / MEMORY_KEY, sizes.memory, 2)
    tensors = _model(bucket_dir / MODEL_KEY, sizes.model, 3)
    objects[MODEL_KEY] = hashlib.sha256((bucket_dir / MODEL_KEY).read_bytes()).hexdigest()

    rng = np.random.default_rng(4)
    small: list[str] = []
    per_dir = 40  # files per leaf directory; leaves spread over ten top-level directories
    for i in range(sizes.small_files):
        leaf = i // per_dir
        key = f"small/d{leaf % 10:02d}/e{leaf // 10:03d}/f{i:05d}.bin"
        data = rng.bytes(SMALL_FILE)
        (bucket_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (bucket_dir / key).write_bytes(data)
        objects[key] = hashlib.sha256(data).hexdigest()
        small.append(key)

    many_dir = bucket_dir / "many"
    many_dir.mkdir()
    many = [f"obj-{n:06d}.txt" for n in range(sizes.many)]
    for n, name in enumerate(many):
        (many_dir / name).write_bytes(b"%015d\n" % n)
    (bucket_dir / "writes").mkdir()
    (bucket_dir / "writes" / ".keep").write_bytes(b"")
    (bucket_dir / "csi").mkdir()
    (bucket_dir / "csi" / ".keep").write_bytes(b"")
    manifest = Manifest(wanted, objects, small, many, tensors)
    manifest.save(manifest_path)
    return manifest
