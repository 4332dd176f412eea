"""Shared type aliases. Dimension names: ``x y z`` are voxel axes in I J K order,
``gx gy gz`` the patch grid, ``embed_dim`` the joint embedding size."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Protocol, TypeAlias

import numpy as np

TypePath: TypeAlias = str | os.PathLike[str]
#: 4 x 4 homogeneous matrix, float64.
TypeAffine: TypeAlias = np.ndarray
#: Receives one short human-readable line per step of a long computation.
TypeStatusCallback: TypeAlias = Callable[[str], None]
#: Receives a fraction of work done in [0, 1].
TypeProgressCallback: TypeAlias = Callable[[float], None]


class TypeGrid(Protocol):
    """A voxel grid: its (I, J, K) ``shape`` and 4 x 4 ``ijk_to_ras`` (a ``Volume`` is one)."""

    shape: tuple[int, ...]
    ijk_to_ras: np.ndarray

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    TypeVolumeArray: TypeAlias = np.ndarray  # (x y z), HU, any real dtype
    TypePatchGridMap: TypeAlias = Float[np.ndarray, "gx gy gz"]
    TypePooledEmbedding: TypeAlias = Float[Tensor, "embed_dim"]
    TypePatchEmbeddings: TypeAlias = Float[Tensor, "embed_dim gx gy gz"]
    TypeBackboneFeatures: TypeAlias = Float[Tensor, "backbone_dim gx gy gz"]
    TypeTextEmbeddings: TypeAlias = Float[Tensor, "num_prompts embed_dim"]
    TypeModelInput: TypeAlias = Float[Tensor, "1 x y z"]
