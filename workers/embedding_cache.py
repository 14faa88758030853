"""Image embeddings kept so that a second prompt on a slice costs only the decoder.

The image encoder is about 95 % of a prompt's time, so workers keep each slice's embedding in memory
(an LRU of float16 tensors) and, with ``$STS_EMBEDDING_CACHE``, on disk where the workers of one host
share them: a slice embedded ahead of the annotator (``workers.jobs.warm_embeddings``) answers its
first click with the decoder alone. Keys hash the network input and the model version, so a changed
preprocessing or model never serves a stale embedding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError
from workers.models.litemedsam import ModelFrame

DEFAULT_EMBEDDING_CACHE_SIZE = 256
"""Image embeddings kept per process (float16, 2 MiB each: 512 MiB at most); a few cases' slices."""

EMBEDDING_CACHE_ENV = "STS_EMBEDDING_CACHE"
"""Folder of the on-disk embedding cache that the workers of one host share (unset: memory only)."""

EMBEDDING_CACHE_GB_ENV = "STS_EMBEDDING_CACHE_GB"
"""Size the on-disk embedding cache is pruned back to, in GB (default ``DEFAULT_EMBEDDING_CACHE_GB``)."""

DEFAULT_EMBEDDING_CACHE_GB = 20.0
"""About 10,000 slices (2 MiB each): the cases a team is working on, not the archive."""

PRUNE_EVERY_PUTS = 1024
"""A disk cache with a budget prunes itself after this many new files (2 GiB): one scan of its
folder (0.1-0.3 s for 10,000 files on two busy cores) per thousand encoder passes keeps it near its budget cheaply, even
at a GPU's hundreds of slices a second."""

STALE_TEMP_S = 3600.0
"""A temporary file this old was left by a worker killed mid-write (a write takes milliseconds)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedSlice:
    """A slice's image embedding ``[1, 256, 64, 64]`` and where the slice lies in the model frame."""

    embedding: torch.Tensor
    frame: ModelFrame
    key: str


class EmbeddingCache:
    """A bounded LRU map from an embedding key to a float16 embedding ``[1, 256, 64, 64]`` (CPU).

    Float16 halves the memory (2 MiB per slice); the decoder always sees the value read back from the
    cache, so a first and a second prompt on a slice give identical masks.
    """

    def __init__(self, max_entries: int = DEFAULT_EMBEDDING_CACHE_SIZE) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, embedding: torch.Tensor) -> torch.Tensor:
        """Store (as float16 on CPU) and return the stored value."""
        stored = embedding.detach().to("cpu", torch.float16).reshape(1, *embedding.shape[-3:]).contiguous()
        with self._lock:
            self._items[key] = stored
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return stored

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class DiskEmbeddingCache(EmbeddingCache):
    """An ``EmbeddingCache`` that also keeps every embedding on disk, for evaluation and fine-tuning.

    Files are ``<root>/<model version>/<key[:2]>/<key>.npz`` (float16 ``embedding [256, 64, 64]``),
    content-addressed by the same key as the memory cache, so a changed preprocessing or model can
    never serve a stale embedding. Writes are atomic (a reader never sees half a file). They are not
    fsynced: a file a power loss left empty or cut short is found unreadable on its next read,
    deleted and computed again, which costs one encoder pass instead of a sync on every write.

    Args:
        max_bytes: with it, the cache prunes itself back to this size after every
            ``PRUNE_EVERY_PUTS`` writes (``prune``), so it stays bounded without warm-ups too.
    """

    def __init__(self, root: str | os.PathLike[str], model_version: str, max_entries: int = 1024,
                 max_bytes: int | None = None) -> None:
        super().__init__(max_entries)
        self.root = Path(root).expanduser() / model_version
        self.max_bytes = max_bytes
        self._puts_since_prune = 0

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> torch.Tensor | None:
        value = super().get(key)
        if value is not None:
            return value
        path = self.path_for(key)
        try:
            with np.load(path) as data:
                embedding = torch.from_numpy(data["embedding"])
            if embedding.ndim != 3:
                raise ValueError(f"an embedding of shape {tuple(embedding.shape)}")
            os.utime(path)  # recently used: pruned last
        except FileNotFoundError:  # absent, or pruned meanwhile: compute it
            return None
        except Exception as exc:  # any unreadable file (cut short, not a zip, not an embedding) is a miss
            log.warning("embedding cache: %s is unreadable (%s: %s); deleted, it will be computed again",
                        path, type(exc).__name__, exc)
            path.unlink(missing_ok=True)
            return None
        self.misses -= 1
        self.hits += 1
        return super().put(key, embedding)

    def __contains__(self, key: str) -> bool:
        return super().__contains__(key) or self.path_for(key).is_file()

    def prune(self, max_bytes: int | None = None) -> int:
        """Delete the least recently used files until the cache holds at most ``max_bytes`` (default
        ``self.max_bytes``); returns how many were deleted.

        Counts every model version's folder under the root, so the embeddings of an encoder no longer
        served go first instead of staying forever. Other workers may read meanwhile (a file gone
        under them is a miss) or write: their temporary files are left alone unless a killed worker
        left them behind (older than ``STALE_TEMP_S``).
        """
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        if max_bytes is None:
            return 0
        files = []
        now = time.time()
        for path in self.root.parent.glob("*/*/*.npz"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.name.startswith("."):  # a write in progress, or one that never finished
                if now - stat.st_mtime > STALE_TEMP_S:
                    path.unlink(missing_ok=True)
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in sorted(files):
            if total <= max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def put(self, key: str, embedding: torch.Tensor) -> torch.Tensor:
        stored = super().put(key, embedding)
        path = self.path_for(key)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.savez(handle, embedding=stored[0].numpy())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            with self._lock:
                self._puts_since_prune += 1
                due = self.max_bytes is not None and self._puts_since_prune >= PRUNE_EVERY_PUTS
                if due:
                    self._puts_since_prune = 0
            if due:
                self.prune()
        return stored


def embedding_key(model_input: np.ndarray, model_version: str) -> str:
    """SHA-1 of the preprocessed 256×256 network input and the weights' version."""
    digest = hashlib.sha1(model_version.encode())
    digest.update(np.ascontiguousarray(model_input, dtype=np.float32).tobytes())
    return digest.hexdigest()


def embedding_cache_budget_bytes() -> int:
    """``$STS_EMBEDDING_CACHE_GB`` (default ``DEFAULT_EMBEDDING_CACHE_GB``) in bytes.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(EMBEDDING_CACHE_GB_ENV, "")
    try:
        gigabytes = float(raw) if raw else DEFAULT_EMBEDDING_CACHE_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes > 0:
        raise ConfigError(f"${EMBEDDING_CACHE_GB_ENV}={raw!r}: expected a positive number of GB")
    return int(gigabytes * 1e9)
