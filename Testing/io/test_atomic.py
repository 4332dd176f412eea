"""Files written whole or not at all (io/atomic.py), the one home of atomic writes."""

from __future__ import annotations

import pytest

from COLIPRISlicerLib.encoding.cache import _PARTIAL_NAME
from COLIPRISlicerLib.io.atomic import atomic_path, write_text_atomically


def test_a_write_replaces_the_file_only_when_it_is_complete(tmp_path):
    target = tmp_path / "sub" / "record.yaml"
    write_text_atomically(target, "old")
    with atomic_path(target) as partial:
        partial.write_text("new")
        assert target.read_text() == "old"  # readers see the old file while the new one is written
        assert partial.parent == target.parent and _PARTIAL_NAME.fullmatch(partial.name)
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["record.yaml"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "record.yaml"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as partial:
            partial.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.yaml"]


def test_two_writers_of_one_path_get_private_names(tmp_path):
    with atomic_path(tmp_path / "a.bin") as first, atomic_path(tmp_path / "a.bin") as second:
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert (tmp_path / "a.bin").read_bytes() in (b"1", b"2") and len(list(tmp_path.iterdir())) == 1
