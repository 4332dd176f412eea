"""``colipri-slicer cache``: list or clear the on-disk embedding cache of the models' encodings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.cli.options import check_cache_dir
from COLIPRISlicerLib.defaults import embedding_cache_dir
from COLIPRISlicerLib.encoding.cache import EncodingCache


def cache_list(cache_dir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Show cached encodings."""
    folder = cache_dir or embedding_cache_dir()
    check_cache_dir(folder)
    entries = EncodingCache(0, folder).entries()
    typer.echo(f"{len(entries)} cached encoding(s) in {folder}")
    for entry in entries:
        typer.echo(f"  {entry.key}  {entry.size_bytes / 1e6:7.1f} MB  {entry.metadata.get('volume', '?')}"
                   f"  {entry.metadata.get('model', '')}")


def cache_clear(cache_dir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Delete cached encodings (only the files the cache wrote; anything else in the folder stays)."""
    folder = cache_dir or embedding_cache_dir()
    check_cache_dir(folder)
    removed = EncodingCache(0, folder).clear()
    typer.echo(f"Removed {removed} cached encoding(s) from {folder}")
