"""Caches of image encodings: in memory (LRU) and optionally on disk (safetensors)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.geometry import PatchGrid
from COLIPRISlicerLib.io.atomic import atomic_path

logger = logging.getLogger(__name__)
TENSOR_NAMES = ("pooled", "dense", "features", "image")
#: The Cache Directory Tagging Specification's file (https://bford.info/cachedir/): it marks a
#: folder as a cache that backup tools skip, and tells ``clear`` the folder is ours.
CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
PROMPTS_FOLDER = "prompts"
_PARTIAL_NAME = re.compile(r".+\.\d+\.[0-9a-f]{8}\.partial")
_PROMPT_TABLE_NAME = re.compile(r"[0-9a-f]{16}\.safetensors")
#: Version of what the disk caches hold (layout and meaning of the tensors); bump it when that changes.
CACHE_FORMAT_VERSION = 2
#: Packages whose version can change the cached numbers (image preprocessing, encoders, tokenizer).
NUMBERS_PACKAGES = ("colipri", "torchio", "torch", "transformers")
#: This project's source files that compute cached numbers: any edit to them invalidates the caches.
NUMBERS_SOURCES = ("preprocessing.py", "encoding/encoder.py", "encoding/text.py")


@functools.lru_cache(maxsize=1)
def numbers_version() -> str:
    """Part of every disk-cache key: the cache format, the versions of ``NUMBERS_PACKAGES`` and a
    digest of ``NUMBERS_SOURCES``, so that a new release never serves numbers an older one cached."""
    package = Path(__file__).resolve().parents[1]
    sources = hashlib.sha256(b"".join((package / name).read_bytes() for name in NUMBERS_SOURCES)).hexdigest()[:16]
    versions = ";".join(f"{name}={package_version(name)}" for name in NUMBERS_PACKAGES)
    return f"format={CACHE_FORMAT_VERSION};{versions};sources={sources}"


def package_version(name: str) -> str:
    """The installed version of a distribution, or ``absent``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


class NotACacheError(ValueError):
    """``clear`` was pointed at a folder that holds no COLIPRISlicer cache."""


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
        max_disk_bytes: the on-disk encodings are kept below this size: after each write the
            least recently used files go (a read counts as a use). None: no bound.

    Several processes may share a folder: writes go to a private temporary file that is
    renamed into place, and files another process removed meanwhile are skipped.
    """

    def __init__(self, max_items: int, folder: Path | None = None, max_disk_bytes: int | None = None):
        self.max_items = max_items
        self.folder = Path(folder) if folder is not None else None
        self.max_disk_bytes = max_disk_bytes
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
            self._touch(key)
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
        meta = {"grid": encoding.grid.as_dict(), "cropped_mm": list(encoding.cropped_mm),
                "encode_seconds": encoding.encode_seconds, **metadata}
        tensors = {name: getattr(encoding, name).contiguous() for name in TENSOR_NAMES}
        mark_cache_folder(self.folder)
        _save_atomically(tensors, path, metadata={"colipri_slicer": json.dumps(meta)})
        self._evict(keep=path)

    def _touch(self, key: str) -> None:
        """Mark an encoding as used now (eviction removes the least recently used first)."""
        path = self._path(key)
        if path is not None:
            try:
                os.utime(path)
            except OSError:  # read-only cache, or removed by another process: nothing to mark
                pass

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used files until the folder fits ``max_disk_bytes`` (never
        ``keep``), and temporary files a crashed writer left more than an hour ago."""
        if self.max_disk_bytes is None:
            return
        stats = []
        encodings, others = cache_files(self.folder)
        for path in [*encodings, *(path for path in others if path.parent == self.folder)]:
            try:
                stats.append((path, path.stat()))
            except OSError:  # removed by another process meanwhile
                continue
        total = sum(stat.st_size for _, stat in stats)
        for path, stat in sorted(stats, key=lambda item: item[1].st_mtime_ns):
            if path == keep:
                continue
            if path.suffix == ".partial":
                if time.time() - stat.st_mtime < 3600:  # another writer's file, still being written
                    continue
            elif total <= self.max_disk_bytes:
                continue
            try:
                path.unlink()
            except OSError:
                continue
            total -= stat.st_size
            logger.info("Removed %s from the encoding cache (bound %.1f GB).", path.name, self.max_disk_bytes / 1e9)

    def entries(self) -> list[CacheEntry]:
        """Encodings stored on disk, most recently used first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        from safetensors import safe_open

        result = []
        encodings, _ = cache_files(self.folder)  # other safetensors files (damaged, not ours) are not listed
        for path in sorted(encodings, key=lambda p: p.stat().st_mtime, reverse=True):
            with safe_open(str(path), framework="pt") as file:
                meta = json.loads(file.metadata().get("colipri_slicer", "{}"))
            result.append(CacheEntry(path.stem, path, path.stat().st_size, meta))
        return result

    def clear(self, *, disk: bool = True) -> int:
        """Forget everything in memory and (by default) delete the files this cache wrote.

        Only cache files are deleted: encodings (safetensors carrying this project's metadata),
        prompt tables, temporary ``.partial`` files and the ``CACHEDIR.TAG``; anything else in
        the folder stays, and the folder itself goes only if nothing else is left in it.
        Returns the number of encodings removed.

        Raises:
            NotACacheError: the folder has neither a COLIPRISlicer ``CACHEDIR.TAG`` nor a
                cache file; nothing is deleted.
        """
        self._memory.clear()
        if not disk or self.folder is None or not self.folder.is_dir():
            return 0
        encodings, others = cache_files(self.folder)
        if not is_cache_folder(self.folder) and not encodings and not others:
            raise NotACacheError(
                f"{self.folder} does not look like a COLIPRISlicer cache (no {CACHEDIR_TAG}, no cached "
                "encodings); nothing was deleted. Pass the folder that `colipri-slicer cache list` shows.")
        removed = sum(_unlink(path) for path in encodings)
        for path in others:
            _unlink(path)
        _remove_if_empty(self.folder / PROMPTS_FOLDER)
        kept = [path.name for path in self.folder.iterdir() if path.name != CACHEDIR_TAG]
        if kept:
            logger.info("Kept %d file(s) in %s that the cache did not write.", len(kept), self.folder)
        else:
            _unlink(self.folder / CACHEDIR_TAG)
            _remove_if_empty(self.folder)
        return removed


def mark_cache_folder(folder: Path) -> None:
    """Create ``folder`` and tag it as this project's cache (idempotent)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = folder / CACHEDIR_TAG
    if not tag.exists():
        tag.write_text(f"{CACHEDIR_SIGNATURE}\n# This file is a cache directory tag created by COLIPRISlicer.\n"
                       "# `colipri-slicer cache clear` deletes only the files COLIPRISlicer wrote here.\n")


def is_cache_folder(folder: Path) -> bool:
    """Whether ``folder`` carries this project's ``CACHEDIR.TAG``."""
    try:
        text = (folder / CACHEDIR_TAG).read_text(errors="replace")
    except OSError:
        return False
    return text.startswith(CACHEDIR_SIGNATURE) and "COLIPRISlicer" in text


def cache_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(encodings, other cache files) that this project wrote into ``folder``: encodings are
    safetensors files whose metadata is ours; others are prompt tables and temporary files."""
    encodings = [path for path in folder.glob("*.safetensors") if _is_encoding_file(path)]
    prompts = folder / PROMPTS_FOLDER
    others = [path for path in folder.iterdir() if path.is_file() and _PARTIAL_NAME.fullmatch(path.name)]
    if prompts.is_dir():
        others += [path for path in prompts.iterdir() if path.is_file()
                   and (_PROMPT_TABLE_NAME.fullmatch(path.name) or _PARTIAL_NAME.fullmatch(path.name))]
    return encodings, others


def _is_encoding_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return "colipri_slicer" in (file.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file of ours: not ours to delete
        return False


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except OSError:  # removed by another process meanwhile
        return 0
    return 1


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # absent, or holds files that are not ours
        pass


class PromptStore:
    """Prompt embeddings on disk, one safetensors file per table, i.e. per model weights and text
    precision (``<folder>/prompts/<sha256(table)[:16]>``, table e.g. ``"<weights sha256>:fp32"``).

    With it, reopening a cached scan scores the catalogue without building the text encoder.
    Keys are SHA-1 digests of the prompt text; a damaged file is ignored and rewritten.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder) / PROMPTS_FOLDER
        self._tables: dict[str, dict[str, object]] = {}
        self._dirty: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(folder={self.folder})"

    def get(self, table: str, prompts):
        """(N, embed_dim) stored embeddings of ``prompts``, or None unless every one is stored."""
        import torch

        stored = self._table(table)
        keys = [_prompt_key(prompt) for prompt in prompts]
        if not keys or any(key not in stored for key in keys):
            return None
        return torch.stack([stored[key] for key in keys])

    def put(self, table: str, prompts, embeddings) -> None:
        """Keep (N, embed_dim) embeddings of ``prompts``; :meth:`flush` writes them (not on the re-query path)."""
        stored = self._table(table)
        keyed = {_prompt_key(prompt): embedding for prompt, embedding in zip(prompts, embeddings)}
        new = {key: embedding.contiguous() for key, embedding in keyed.items() if key not in stored}
        if new:
            stored.update(new)
            self._dirty.add(table)

    def flush(self) -> None:
        """Write the tables that gained prompts since the last flush (atomically)."""
        for table in sorted(self._dirty):
            mark_cache_folder(self.folder.parent)
            _save_atomically(self._tables[table], self._path(table))
        self._dirty.clear()

    def _path(self, table: str) -> Path:
        return self.folder / f"{hashlib.sha256(table.encode()).hexdigest()[:16]}.safetensors"

    def _table(self, table: str) -> dict:
        if table not in self._tables:
            self._tables[table] = self._read(self._path(table))
        return self._tables[table]

    @staticmethod
    def _read(path: Path) -> dict:
        if not path.is_file():
            return {}
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as error:  # noqa: BLE001 - a damaged store is rebuilt
            logger.warning("Ignoring unreadable prompt store %s (%s).", path, error)
            return {}


def _save_atomically(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors file written under a name private to this writer, then renamed into place:
    readers never see a partial file, and two processes writing the same path do not mix."""
    from safetensors.torch import save_file

    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)


def _prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()
