"""All geometry: IJK <-> RAS <-> LPS, the model's patch grid, and resampling back.

Frames: RAS millimetres (Slicer, TorchIO) everywhere in this package; ITK/DICOM/SimpleITK
use LPS, converted only here. Matrices are named ``<from>_to_<to>``. Functions take a shape
and a 4 x 4 matrix, or a grid (anything with ``shape`` and ``ijk_to_ras``), never a ``Volume``.

- :mod:`.frames`: IJK <-> RAS <-> LPS, affine validation, the ITK geometry of an array.
- :mod:`.slices`: the array axis closest to S, plane centres, slice S positions, the S range.
- :mod:`.resample`: resampling a map onto a target volume's own grid (CPU or torch device).
- :mod:`.grid`: the model's patch grid (:class:`PatchGrid`).
- :mod:`.plan`: the processor's spatial steps (ToOrientation -> Resample -> CropOrPad) as index arithmetic.
"""

from __future__ import annotations

from COLIPRISlicerLib.geometry.frames import (
    FLIP_XY,
    apply_affine,
    array_to_sitk,
    axis_closest_to_s,
    closest_ras_permutation,
    ijk_to_ras,
    ijk_to_ras_from_itk,
    itk_from_ijk_to_ras,
    ras_ordered_view,
    ras_to_ijk,
    shifted_affine,
    spacing_of,
    validate_affine,
    view_index_to_ijk,
)
from COLIPRISlicerLib.geometry.grid import PatchGrid
from COLIPRISlicerLib.geometry.plan import (
    AxisSampling,
    ResamplingPlan,
    closest_axes,
    crop_or_pad_bounds,
    resampling_plan,
)
from COLIPRISlicerLib.geometry.resample import (  # _resample_separable: compared with SimpleITK by the tests
    _resample_separable,
    factored_nearest_to_volume,
    resample_to_volume,
    resample_to_volume_on_device,
    separable_weights,
)
from COLIPRISlicerLib.geometry.slices import (
    plane_centre_ras,
    plane_centres_ras,
    point_on_plane,
    s_range_mm,
    slice_index_of,
    slice_s_mm,
)

__all__ = [
    "FLIP_XY",
    "AxisSampling",
    "PatchGrid",
    "ResamplingPlan",
    "apply_affine",
    "array_to_sitk",
    "axis_closest_to_s",
    "closest_axes",
    "closest_ras_permutation",
    "crop_or_pad_bounds",
    "factored_nearest_to_volume",
    "ijk_to_ras",
    "ijk_to_ras_from_itk",
    "itk_from_ijk_to_ras",
    "plane_centre_ras",
    "plane_centres_ras",
    "point_on_plane",
    "ras_ordered_view",
    "ras_to_ijk",
    "resample_to_volume",
    "resample_to_volume_on_device",
    "resampling_plan",
    "s_range_mm",
    "separable_weights",
    "shifted_affine",
    "slice_index_of",
    "slice_s_mm",
    "spacing_of",
    "validate_affine",
    "view_index_to_ijk",
]
