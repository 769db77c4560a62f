"""Where kvflow keeps what it derives from files once and reuses across runs: converted tokenizers,
dequantized GGUF weights, kernel builds, kernel-choice calibrations, dataset indexes.
$KVFLOW_CACHE moves it (default ~/.cache/kvflow); deleting it is always safe."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    return Path(os.environ.get("KVFLOW_CACHE", Path.home() / ".cache" / "kvflow")).joinpath(*parts)


def file_key(path: Path, salt: str = "") -> str:
    """A short key for a file's identity (path, size, modification time): a changed file misses."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{salt}".encode()).hexdigest()[:16]
