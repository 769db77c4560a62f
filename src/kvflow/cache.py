"""Where kvflow keeps what it derives from files once and reuses across runs: converted tokenizers,
dequantized GGUF weights, kernel builds, kernel-choice calibrations, dataset indexes (keyed by the
contents of the files they come from).
$KVFLOW_CACHE moves it (default ~/.cache/kvflow); deleting it is always safe."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    return Path(os.environ.get("KVFLOW_CACHE", Path.home() / ".cache" / "kvflow")).joinpath(*parts)


def write_atomic(path: Path, text: str) -> None:
    """Write a cache file so that readers (other processes on this machine share the cache) see the
    old contents or the whole new ones, never a part. Raises OSError (e.g. a read-only cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_key(path: Path, salt: str = "") -> str:
    """A short key for a file's contents: a changed file misses, and the same file installed anew
    (a fresh virtualenv: another path, another modification time) hits what was derived from it."""
    return hashlib.sha256(f"{content_digest(path)}:{salt}".encode()).hexdigest()[:16]


_digests: dict[str, str] = {}


def content_digest(path: Path) -> str:
    """sha256 of the file, read once per (path, size, modification time) on this machine: remembered
    under file-digests/ (hashing a 5 GB model takes seconds; looking it up, nothing). A folder (a
    Hugging Face model): the digest of its files' names and digests."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return hashlib.sha256("".join(f"{p.name}:{content_digest(p)}\n" for p in files).encode()).hexdigest()
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if identity in _digests:
        return _digests[identity]
    index = cache_dir("file-digests", hashlib.sha256(identity.encode()).hexdigest()[:16])
    try:
        digest = index.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 64:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        digest = h.hexdigest()
        try:
            write_atomic(index, digest)
        except OSError:  # a read-only cache: hash again next time
            pass
    _digests[identity] = digest
    return digest
