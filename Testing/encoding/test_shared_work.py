"""Work done once per volume and shared: the coarse anatomy grid of landmarks and body mask."""

from __future__ import annotations

import numpy as np
from conftest import RAS_NIFTI, require

from COLIPRISlicerLib.io.volume import load_volume


def test_landmarks_and_body_mask_of_one_volume_share_one_coarse_grid(monkeypatch):
    """Report (landmarks) and snippets (body mask) of one volume block-average its voxels once."""
    from COLIPRISlicerLib.localization import landmarks

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


def test_body_patches_from_the_coarse_mask_equal_those_of_the_full_resolution_mask(tmp_path):
    """The body mask goes straight from its coarse grid onto the model grid (no 512 x 512 x n copy):
    the same patch fractions as resampling the full-resolution mask, on real scans."""
    from colipri import get_processor
    from conftest import TCIA_SERIES, write_oblique_permuted_copy

    from COLIPRISlicerLib.findings.scoring import factored_mask_to_patch_fraction, mask_to_patch_fraction
    from COLIPRISlicerLib.localization.landmarks import body_mask, body_mask_factors
    from COLIPRISlicerLib.preprocessing import preprocess

    transform = get_processor(image_only=True)._image_transform
    oblique = write_oblique_permuted_copy(require(RAS_NIFTI), tmp_path / "oblique.nii.gz")
    for path in (RAS_NIFTI, oblique, require(TCIA_SERIES)):
        volume = load_volume(path)
        grid = preprocess(volume, transform).patch_grid((8, 8, 8))
        expected = mask_to_patch_fraction(body_mask(volume.array, volume.ijk_to_ras), volume, grid)
        ours = factored_mask_to_patch_fraction(*body_mask_factors(volume.array, volume.ijk_to_ras), volume, grid)
        np.testing.assert_array_equal(ours, expected)
        assert 0.05 < float((ours > 0.5).mean()) < 0.95  # a body, not an empty or full mask
