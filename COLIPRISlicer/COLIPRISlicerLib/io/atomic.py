"""Files written whole or not at all: written beside the target under a name private to the
writer, then renamed onto it. Readers never see a partial file, two processes writing the same
path do not mix, and a failed write leaves the old file (or nothing) and no temporary behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from COLIPRISlicerLib.types import TypePath

#: Suffix of the private names (``<name>.<pid>.<8 hex>.partial``); ``cache clear`` recognises them.
PARTIAL_SUFFIX = ".partial"


@contextmanager
def atomic_path(path: TypePath) -> Iterator[Path]:
    """A private path beside ``path`` to write to, renamed onto ``path`` when the block succeeds.

    Example:
        >>> with atomic_path(folder / "table.parquet") as partial:  # doctest: +SKIP
        ...     pyarrow.parquet.write_table(table, partial)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)  # only ever our own private file


def write_text_atomically(path: TypePath, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
