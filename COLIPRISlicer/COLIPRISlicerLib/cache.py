"""Caches of image encodings: in memory (LRU) and optionally on disk (safetensors)."""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .encoding import ImageEncoding
from .geometry import PatchGrid

logger = logging.getLogger(__name__)
TENSOR_NAMES = ("pooled", "dense", "features", "image")


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size_bytes: int
    metadata: dict


class EncodingCache:
    """``get_or_compute(key, compute)`` over memory, then disk, then ``compute()``.

    Args:
        max_items: encodings kept in memory.
        folder: on-disk cache folder, or None for memory only.
    """

    def __init__(self, max_items: int, folder: Path | None = None):
        self.max_items = max_items
        self.folder = Path(folder) if folder is not None else None
        self._memory: OrderedDict[str, ImageEncoding] = OrderedDict()
        self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_memory={len(self._memory)}, folder={self.folder})"

    def get_or_compute(self, key: str, compute: Callable[[], ImageEncoding], metadata: dict | None = None) -> ImageEncoding:
        encoding = self._memory.get(key) or self._read(key)
        if encoding is None:
            self.misses += 1
            logger.debug("Encoding cache miss %s", key)
            encoding = compute()
            self._write(encoding, metadata or {})
        else:
            self.hits += 1
            logger.debug("Encoding cache hit %s", key)
        self._memory[key] = encoding
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)
        return encoding

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def _read(self, key: str) -> ImageEncoding | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                tensors = {name: file.get_tensor(name) for name in TENSOR_NAMES}
                meta = json.loads(file.metadata()["colipri_slicer"])
        except Exception as error:  # noqa: BLE001 - a damaged cache file is recomputed
            logger.warning("Ignoring unreadable cache file %s (%s).", path, error)
            return None
        return ImageEncoding(**tensors, grid=PatchGrid.from_dict(meta["grid"]),
                             cropped_mm=tuple(meta["cropped_mm"]), key=key, encode_seconds=meta["encode_seconds"])

    def _write(self, encoding: ImageEncoding, metadata: dict) -> None:
        path = self._path(encoding.key)
        if path is None:
            return
        from safetensors.torch import save_file

        meta = {"grid": encoding.grid.as_dict(), "cropped_mm": list(encoding.cropped_mm),
                "encode_seconds": encoding.encode_seconds, **metadata}
        tensors = {name: getattr(encoding, name).contiguous() for name in TENSOR_NAMES}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"colipri_slicer": json.dumps(meta)})
        partial.replace(path)

    def entries(self) -> list[CacheEntry]:
        """Encodings stored on disk, newest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        from safetensors import safe_open

        result = []
        for path in sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
            with safe_open(str(path), framework="pt") as file:
                meta = json.loads(file.metadata().get("colipri_slicer", "{}"))
            result.append(CacheEntry(path.stem, path, path.stat().st_size, meta))
        return result

    def clear(self, *, disk: bool = True) -> int:
        """Forget everything in memory and (by default) delete the disk cache; returns files removed."""
        self._memory.clear()
        removed = 0
        if disk and self.folder is not None and self.folder.is_dir():
            removed = len(list(self.folder.glob("*.safetensors")))
            shutil.rmtree(self.folder)
        return removed
