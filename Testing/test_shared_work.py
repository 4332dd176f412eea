"""Work done once per volume and shared: the coarse anatomy grid of landmarks and body mask."""

from __future__ import annotations

import numpy as np
from conftest import RAS_NIFTI, require

from COLIPRISlicerLib.volume import load_volume


def test_landmarks_and_body_mask_of_one_volume_share_one_coarse_grid(monkeypatch):
    """Report (landmarks) and snippets (body mask) of one volume block-average its voxels once."""
    from COLIPRISlicerLib import landmarks

    volume = load_volume(require(RAS_NIFTI))
    calls = []
    build = landmarks._build_grid
    monkeypatch.setattr(landmarks, "_build_grid", lambda *args: calls.append(1) or build(*args))
    landmarks._LAST_GRID.clear()
    found = landmarks.detect_landmarks(volume.array, volume.ijk_to_ras)
    mask = landmarks.body_mask(volume.array, volume.ijk_to_ras)
    assert len(calls) == 1
    writable = np.array(volume.array)  # a caller's writable array may change between calls: no reuse
    assert landmarks.detect_landmarks(writable, volume.ijk_to_ras) == found
    np.testing.assert_array_equal(landmarks.body_mask(writable, volume.ijk_to_ras), mask)
    assert len(calls) == 3
