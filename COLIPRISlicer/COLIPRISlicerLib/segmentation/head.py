"""Segmentation on frozen COLIPRI features: a light trained decoder, or zero-shot heatmaps.

The released COLIPRI weights have no segmentation head. ``SegmentationDecoder`` is a small
UNETR-style decoder (MONAI blocks) trained on top of the frozen backbone: backbone features
(C, gx, gy, gz) are upsampled ``log2(patch)`` times by 2 (three times for 8^3 patches) to the
model grid (X, Y, Z), fusing at every level a skip computed from the preprocessed image, so
edges the 16 mm patches cannot resolve come from the image itself. ``predict`` brings the
per-label probabilities back onto the input volume's grid. A head may decode onto a grid
``refine`` times finer than the model's (``HeadConfig.refine``): one more upsampling level,
whose image skip is the input volume resampled onto the subdivided model grid
(``preprocessing.resample_for_head``), so findings a few model voxels wide (nodules on a 5 mm
grid) get edges from the image at that finer spacing.

Without a trained head, ``zero_shot_segmentation`` labels voxels by the finding whose
per-patch heatmap logit is highest above a threshold, at patch resolution.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrUpBlock
from torch import nn

from COLIPRISlicerLib.geometry import PatchGrid, resample_to_volume, spacing_of
from COLIPRISlicerLib.preprocessing import head_input
from COLIPRISlicerLib.segmentation.files import (
    HEAD_WEIGHTS,
    MORPHOLOGICALLY_ALTERED_STRUCTURE,
    TISSUE,
    HeadMetadata,
    LabelInfo,
    SegmentationResult,
    check_encoder,
    default_colour,
    read_head_metadata,
    read_weights,
)
from COLIPRISlicerLib.segmentation.postprocessing import apply_rules
from COLIPRISlicerLib.types import TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.encoder import ImageEncoding
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.io.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    """Architecture hyper-parameters of a ``SegmentationDecoder``.

    Attributes:
        in_channels: backbone feature channels C (864 for COLIPRI).
        num_classes: output channels, background included.
        patch_size: voxels per patch edge (a power of two, e.g. 8); sets the number of
            2x upsampling levels.
        base_channels: channels at the output resolution; doubled at every coarser level.
        max_channels: cap on the channels of any level.
        norm: MONAI normalisation name ("instance", "batch", ...).
        refine: the output grid splits every model voxel into refine^3 (a power of two; 1 =
            the model grid); one more 2x level per factor of 2.
    """

    in_channels: int
    num_classes: int
    patch_size: int
    base_channels: int = 16
    max_channels: int = 128
    norm: str = "instance"
    refine: int = 1

    def __post_init__(self):
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"Patch size must be a power of two >= 2, got {self.patch_size}.")
        if self.refine < 1 or self.refine & (self.refine - 1):
            raise ValueError(f"refine must be a power of two >= 1 (1 = the model grid), got {self.refine}.")
        if self.num_classes < 2 or self.in_channels < 1 or self.base_channels < 1:
            message = f"Need >= 2 classes (background included), >= 1 input and base channel; got {self}."
            raise ValueError(message)

    @property
    def levels(self) -> int:
        """Number of 2x upsampling steps from the patch grid to the output grid."""
        return int(math.log2(self.patch_size * self.refine))

    @property
    def image_stride(self) -> int:
        """Output-grid voxels per patch edge: the image input has this many per feature cell."""
        return self.patch_size * self.refine

    def channels(self, level: int) -> int:
        """Channels at ``level`` (0 = output grid, ``levels`` = patch grid)."""
        return min(self.base_channels * 2**level, self.max_channels)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


class SegmentationDecoder(nn.Module):
    """Frozen-feature decoder: (B, C, gx, gy, gz) + (B, 1, X, Y, Z) -> (B, classes, X, Y, Z).

    X = gx * patch_size * refine: the image is the model input (refine 1) or the input volume
    on the subdivided model grid.

    Image skips: a residual block at full resolution, then strided residual blocks down to
    1/2^(levels-1). Features: a residual block to the coarsest channel count, then one
    ``UnetrUpBlock`` (transposed conv x2, concatenate skip, residual block) per level.
    """

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        levels, norm = config.levels, config.norm
        stem = UnetrBasicBlock(3, 1, config.channels(0), 3, 1, norm, res_block=True)
        downs = [UnetResBlock(3, config.channels(lv - 1), config.channels(lv), 3, 2, norm) for lv in range(1, levels)]
        self.image_blocks = nn.ModuleList([stem, *downs])
        self.bottleneck = UnetrBasicBlock(3, config.in_channels, config.channels(levels), 3, 1, norm, res_block=True)
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(3, config.channels(lv), config.channels(lv - 1), 3, 2, norm, res_block=True)
            for lv in range(levels, 0, -1)
        )
        self.output = UnetOutBlock(3, config.channels(0), config.num_classes)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = image
        for block in self.image_blocks:
            x = block(x)
            skips.append(x)
        x = self.bottleneck(features)
        for block, skip in zip(self.up_blocks, reversed(skips)):
            x = block(x, skip)
        return self.output(x)


@dataclass(eq=False)
class SegmentationHead:
    """A decoder with its metadata (labels, encoder identity, validation Dice)."""

    network: SegmentationDecoder
    metadata: HeadMetadata

    @property
    def labels(self) -> list[LabelInfo]:
        return self.metadata.labels

    def __repr__(self) -> str:
        names = [label.name for label in self.labels]
        return f"{type(self).__name__}(labels={names}, encoder={self.metadata.encoder.get('model_id')!r})"


def load_head(folder: TypePath, engine: Engine) -> SegmentationHead:
    """Load a head folder for use with an engine's encoder.

    Args:
        folder: a folder holding ``head.safetensors`` and ``head.json``.
        engine: the ``Engine`` whose features the head will decode.

    Returns:
        A ``SegmentationHead`` in eval mode on the engine's device.

    Raises:
        FileNotFoundError: If the folder or one of its two files is missing.
        RuntimeError: If the head was trained on another encoder (sha256 differs), or a
            file is corrupt or does not match the architecture in ``head.json``.
    """
    folder = Path(folder)
    metadata = read_head_metadata(folder)
    check_encoder(metadata, folder, engine)
    network = SegmentationDecoder(HeadConfig.from_dict(metadata.architecture))
    network.load_state_dict(read_weights(folder / HEAD_WEIGHTS, network))
    network.to(engine.identity.device).eval()
    logger.info("Loaded segmentation head %s (%d labels).", folder, len(metadata.labels))
    return SegmentationHead(network, metadata)


def create_head(engine: Engine, grid: PatchGrid, in_channels: int, values: list[int], names: dict[int, str] | None = None,
                *, base_channels: int = 16, refine: int = 1) -> SegmentationHead:
    """A randomly initialised head for an engine's encoder (the torch seed decides the weights).

    Args:
        engine: the ``Engine`` whose encoder identity goes into the metadata.
        grid: the patch grid of that engine's encodings (model shape, patch size).
        in_channels: backbone feature channels C.
        values: sorted label values, 0 (background) first; channel c predicts values[c].
        names: label value -> name (default "Label <value>").
        base_channels: decoder channels at the output resolution.
        refine: output grid = model grid with every voxel split into refine^3.

    Raises:
        NotImplementedError: For non-cubic patches.
    """
    if len(set(grid.patch_size)) != 1:
        raise NotImplementedError(f"The head needs cubic patches; the model has {grid.patch_size}.")
    config = HeadConfig(in_channels, len(values), grid.patch_size[0], base_channels=base_channels, refine=refine)
    names = names or {}
    labels = [LabelInfo(v, names.get(v, f"Label {v}"), default_colour(i), {"category": TISSUE, "type": TISSUE})
              for i, v in enumerate(values[1:])]
    identity = engine.identity
    encoder = {"model_id": identity.model_id, "revision": identity.revision, "sha256": identity.sha256}
    preprocessing = {"model_shape": list(grid.model_shape), "patch_size": list(grid.patch_size),
                     "spacing_mm": [round(float(mm), 6) for mm in spacing_of(grid.model_to_ras)], "refine": refine}
    return SegmentationHead(SegmentationDecoder(config), HeadMetadata(labels, encoder, preprocessing, config.as_dict()))


def check_inputs(config: HeadConfig, features: torch.Tensor, image: torch.Tensor) -> None:
    """Raise a ValueError unless features (C, gx, gy, gz) and image (1, X, Y, Z) fit the head."""
    expected_image = tuple(n * config.image_stride for n in features.shape[1:])
    if features.ndim != 4 or features.shape[0] != config.in_channels:
        message = (
            f"Expected features (C={config.in_channels}, gx, gy, gz), got {tuple(features.shape)}: the head was"
            " trained on another encoder. Load a head trained for this model."
        )
        raise ValueError(message)
    if tuple(image.shape) != (1, *expected_image):
        shape = ", ".join(map(str, expected_image))
        message = (f"Expected the head's image input of shape (1, {shape}), got {tuple(image.shape)}: encoding and"
                   " head differ.")
        raise ValueError(message)


def grid_probabilities(head: SegmentationHead, features: torch.Tensor, image: torch.Tensor) -> np.ndarray:
    """(classes, X, Y, Z) float32 softmax probabilities on the head's grid (the model grid subdivided ``refine`` times).

    Args:
        head: the trained head.
        features: (C, gx, gy, gz) backbone features.
        image: (1, X, Y, Z) from ``preprocessing.head_input``.
    """
    check_inputs(head.network.config, features, image)
    device = next(head.network.parameters()).device
    head.network.eval()
    with torch.no_grad():
        logits = head.network(features[None].float().to(device), image[None].float().to(device))
    return logits.softmax(dim=1)[0].cpu().numpy()


def predict(head: SegmentationHead, encoding: ImageEncoding, volume: Volume, image_transform=None) -> SegmentationResult:
    """Segment a volume with a trained head.

    Args:
        head: from ``load_head`` (its encoder identity was checked there).
        encoding: ``engine.encode(volume)``: features (C, gx, gy, gz), image (1, X, Y, Z).
        volume: the input ``Volume``; the labelmap is on its grid.
        image_transform: the processor's transform (``engine.loaded.image_transform``);
            needed by heads with ``refine`` > 1.

    Returns:
        A result with an (I, J, K) int16 labelmap: per-label probabilities are resampled
        linearly onto the input grid, then the most likely label wins; voxels outside the
        model's field of view are background. The head's shape rules (``head.json``
        ``postprocessing``, :mod:`.postprocessing`) then give elongated components of a round
        finding back to the background.
    """
    image = head_input(volume, image_transform, encoding, head.network.config.refine)
    probabilities = grid_probabilities(head, encoding.features, image)
    values = [0, *(label.value for label in head.labels)]
    _, grid_to_ras = encoding.grid.subdivided(head.network.config.refine)
    resampled = (resample_to_volume(channel, grid_to_ras, volume.shape, volume.ijk_to_ras, linear=True)
                 for channel in probabilities)
    labelmap = _label_of_best(zip(values, resampled), volume.shape)
    rules = head.metadata.postprocessing
    removed = apply_rules(labelmap, rules, volume.ijk_to_ras)
    spacing = _format_mm(spacing_of(grid_to_ras))
    metadata = {"encoder": head.metadata.encoder, "validation_dice": head.metadata.validation_dice}
    description = f"segmentation head, {spacing} mm grid"
    if rules:
        metadata["postprocessing"] = {"rules": copy.deepcopy(rules),  # the head's own stay as they are
                                      "voxels_removed": {str(value): count for value, count in removed.items()}}
        description += ", " + "; ".join(f"components of label {value} with elongation > {rule['max_elongation']:g}"
                                        " removed" for value, rule in rules.items())
    return SegmentationResult(labelmap, np.array(volume.ijk_to_ras), list(head.labels), "head", description, metadata)


def _label_of_best(scores, shape: tuple[int, int, int]) -> np.ndarray:
    """(I, J, K) int16 in Fortran order: per voxel, the value whose score is highest and above 0.

    Args:
        scores: iterable of (label value, (I, J, K) score), consumed one at a time so memory
            stays at a few input-sized arrays however many labels there are. NaN (outside
            the field of view) never wins.
        shape: (I, J, K) of the input volume.
    """
    # Fortran order, as the separable resampling returns the scores: Slicer's and ITK's memory order
    best = np.zeros(shape, dtype=np.float32, order="F")
    labelmap = np.zeros(shape, dtype=np.int16, order="F")
    for value, score in scores:
        better = score > best
        best[better] = score[better]
        labelmap[better] = value
    return labelmap


def zero_shot_segmentation(
    logit_maps: dict[str, np.ndarray],
    grid: PatchGrid,
    volume: Volume,
    *,
    threshold: float = 0.0,
    colours: dict[str, tuple[float, float, float]] | None = None,
    terminologies: dict[str, dict | None] | None = None,
    linear: bool = True,
) -> SegmentationResult:
    """Label each voxel by the finding whose heatmap logit exceeds ``threshold`` most.

    Args:
        logit_maps: finding name -> (gx, gy, gz) positive-minus-negative logits
            (``engine.pair_logit_maps``); label values 1, 2, ... follow this order.
        grid: the patch grid of the encoding the maps came from.
        volume: the input ``Volume``; the labelmap is on its grid.
        threshold: logit a finding must exceed (0 = P(positive) above 0.5).
        colours: finding name -> (r, g, b) in 0..1; the palette fills in missing ones.
        terminologies: finding name -> catalogue concept ``{scheme, code, meaning}`` or None.
        linear: trilinear interpolation between patch centres (else nearest patch).

    Returns:
        A result with source "zero-shot" at the patch resolution (16 mm for COLIPRI).

    Raises:
        ValueError: If no maps are given or a map is not on the patch grid.
    """
    if not logit_maps:
        raise ValueError("No logit maps given; pass at least one finding's (gx, gy, gz) map.")
    for name, logits in logit_maps.items():
        if tuple(np.shape(logits)) != tuple(grid.shape):
            message = f'Logit map of "{name}" has shape {np.shape(logits)}, expected the patch grid {grid.shape}.'
            raise ValueError(message)
    inside = np.isfinite(grid.to_volume(np.ones(grid.shape, np.float32), volume.shape, volume.ijk_to_ras, linear=True))
    margins = ((value, _margin_on_volume(np.asarray(logits, np.float32) - threshold, grid, volume, inside, linear))
               for value, logits in enumerate(logit_maps.values(), start=1))
    labelmap = _label_of_best(margins, volume.shape)
    labels = [_finding_label(index, name, colours or {}, terminologies or {}) for index, name in enumerate(logit_maps)]
    description = f"zero-shot, {_format_mm(grid.patch_mm)} mm resolution"
    metadata = {"threshold": float(threshold), "interpolation": "linear" if linear else "nearest"}
    return SegmentationResult(labelmap, np.array(volume.ijk_to_ras), labels, "zero-shot", description, metadata)


def _margin_on_volume(margin: np.ndarray, grid: PatchGrid, volume, inside: np.ndarray, linear: bool) -> np.ndarray:
    resampled = grid.to_volume(margin, volume.shape, volume.ijk_to_ras, linear=linear).astype(np.float32)
    resampled[~inside] = np.nan
    return resampled


def _finding_label(index: int, name: str, colours: dict, terminologies: dict) -> LabelInfo:
    colour = tuple(float(c) for c in colours.get(name, default_colour(index)))
    terminology = {"category": MORPHOLOGICALLY_ALTERED_STRUCTURE, "type": terminologies.get(name)}
    return LabelInfo(index + 1, name, colour, terminology)  # type: ignore[arg-type]


def _format_mm(spacing_mm: np.ndarray) -> str:
    """``"16"`` for an isotropic spacing, ``"16 x 16 x 20"`` otherwise."""
    rounded = [round(float(mm), 1) for mm in spacing_mm]
    return f"{rounded[0]:g}" if len(set(rounded)) == 1 else " x ".join(f"{mm:g}" for mm in rounded)
