"""The model's patch grid in RAS: where the model looked, its depth levels, and the way back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from COLIPRISlicerLib.geometry.frames import apply_affine, axis_closest_to_s, ras_to_ijk, spacing_of
from COLIPRISlicerLib.geometry.resample import resample_to_volume
from COLIPRISlicerLib.geometry.slices import plane_centres_ras


@dataclass(frozen=True)
class PatchGrid:
    """Where the model looked: the preprocessed image grid and its patch grid, in RAS.

    Attributes:
        model_shape: (X, Y, Z) of the model input, e.g. (192, 192, 192).
        model_to_ras: IJK->RAS of the preprocessed image (TorchIO's output affine).
        patch_size: voxels per patch along each axis, e.g. (8, 8, 8).
        grid_to_ras: maps a patch index (i, j, k) to the RAS centre of that patch.
    """

    model_shape: tuple[int, int, int]
    model_to_ras: np.ndarray
    patch_size: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(m // p for m, p in zip(self.model_shape, self.patch_size))  # type: ignore[return-value]

    @property
    def grid_to_ras(self) -> np.ndarray:
        patch = np.asarray(self.patch_size, dtype=np.float64)
        patch_to_model = np.eye(4)
        patch_to_model[:3, :3] = np.diag(patch)
        patch_to_model[:3, 3] = (patch - 1) / 2
        return np.asarray(self.model_to_ras) @ patch_to_model

    @property
    def patch_mm(self) -> np.ndarray:
        """Edge length of one patch (mm) along each grid axis."""
        return spacing_of(self.grid_to_ras)

    @property
    def depth_axis(self) -> int:
        """Grid axis closest to S; its planes are the depth levels."""
        return axis_closest_to_s(self.grid_to_ras)

    @property
    def level_mm(self) -> float:
        """Thickness (mm) of one depth level."""
        return float(self.patch_mm[self.depth_axis])

    def level_centre_ras(self, level) -> np.ndarray:
        """(3,) RAS centre of depth level ``level`` ((n, 3) for n levels)."""
        return plane_centres_ras(self.grid_to_ras, self.shape, self.depth_axis, level)

    def level_s_mm(self) -> np.ndarray:
        """(L,) S (mm) of the centre of each depth level, in grid order."""
        return self.level_centre_ras(np.arange(self.shape[self.depth_axis]))[:, 2]

    def by_level(self, grid_map: np.ndarray) -> np.ndarray:
        """(gx, gy, gz, ...) map -> (L, gx*gy*gz/L, ...): one row per depth level."""
        moved = np.moveaxis(np.asarray(grid_map), self.depth_axis, 0)
        return moved.reshape(moved.shape[0], -1, *moved.shape[3:])

    def centres_ras(self) -> np.ndarray:
        """(gx, gy, gz, 3) RAS centre of every patch."""
        indices = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        return apply_affine(self.grid_to_ras, indices)

    def ras_to_patch(self, point_ras: np.ndarray) -> tuple[int, int, int] | None:
        """Index of the patch containing a RAS point, or None outside the field of view."""
        index = np.rint(ras_to_ijk(self.grid_to_ras, point_ras)).astype(int)
        if (index < 0).any() or (index >= np.asarray(self.shape)).any():
            return None
        return tuple(int(i) for i in index)  # type: ignore[return-value]

    def to_volume(self, grid_map: np.ndarray, target_shape, target_ijk_to_ras, **kwargs) -> np.ndarray:
        """Resample a (gx, gy, gz) or (X, Y, Z) map onto a target grid (see resample_to_volume)."""
        if tuple(grid_map.shape) == tuple(self.shape):
            source_to_ras = self.grid_to_ras
        elif tuple(grid_map.shape) == tuple(self.model_shape):
            source_to_ras = self.model_to_ras
        else:
            message = f"Map shape {grid_map.shape} is neither the patch grid {self.shape} nor the model grid {self.model_shape}."
            raise ValueError(message)
        return resample_to_volume(grid_map, source_to_ras, target_shape, target_ijk_to_ras, **kwargs)

    def subdivided(self, factor: int) -> tuple[tuple[int, int, int], np.ndarray]:
        """The model grid with every voxel split into ``factor``^3: (shape, IJK->RAS).

        Same field of view; the children of model voxel v are fine voxels factor * v + 0 ..
        factor - 1, whose centres lie at model index v - (factor - 1) / (2 factor) + i / factor,
        as a stride-``factor`` transposed convolution places them.
        """
        if factor < 1:
            raise ValueError(f"The subdivision factor must be at least 1, got {factor}.")
        fine_to_model = np.eye(4)
        fine_to_model[:3, :3] = np.eye(3) / factor
        fine_to_model[:3, 3] = -(factor - 1) / (2 * factor)
        shape = tuple(int(n) * factor for n in self.model_shape)
        return shape, np.asarray(self.model_to_ras) @ fine_to_model  # type: ignore[return-value]

    def as_dict(self) -> dict:
        return {
            "model_shape": list(self.model_shape),
            "model_to_ras": np.asarray(self.model_to_ras).tolist(),
            "patch_size": list(self.patch_size),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PatchGrid:
        return cls(tuple(data["model_shape"]), np.asarray(data["model_to_ras"]), tuple(data["patch_size"]))
