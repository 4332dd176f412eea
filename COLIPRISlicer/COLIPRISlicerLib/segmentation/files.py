"""Files of the segmentation head: head folders in and out, segmentation results out.

Head folder (written by training, read by :func:`load_head`)::

    head.safetensors   decoder weights (float32)
    head.json          metadata: format version, labels (value, name, colour, terminology),
                       the encoder it was trained on (model_id, revision, sha256),
                       preprocessing (model_shape, patch_size, spacing_mm), architecture
                       (``HeadConfig``), training data summary, validation Dice per label

Segmentation output (:func:`write_segmentation`)::

    segmentation.nii.gz  int16 labelmap on the input volume's own grid (0 = background)
    segmentation.json    label values -> names, colours, terminology; source; description

Terminology concepts use the findings catalogue's form ``{scheme, code, meaning}``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from COLIPRISlicerLib.io.atomic import write_text_atomically
from COLIPRISlicerLib.types import TypeAffine, TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.io.volume import Volume


logger = logging.getLogger(__name__)

HEAD_WEIGHTS = "head.safetensors"
HEAD_METADATA = "head.json"
SEGMENTATION_IMAGE = "segmentation.nii.gz"
SEGMENTATION_JSON = "segmentation.json"
#: head.json's format: 2 adds ``postprocessing`` (shape rules an older reader would skip); heads without rules write 1.
FORMAT_VERSION = 2

#: Slicer's default segment terminology (category and type "Tissue").
TISSUE = {"scheme": "SCT", "code": "85756007", "meaning": "Tissue"}
#: DICOM CID 7150 category of lesions and other abnormal findings.
MORPHOLOGICALLY_ALTERED_STRUCTURE = {
    "scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure",
}
#: Distinct label colours (r, g, b in 0..1), used in order when none is given.
PALETTE = (
    (0.90, 0.30, 0.25), (0.25, 0.60, 0.90), (0.35, 0.80, 0.35), (0.95, 0.75, 0.20), (0.65, 0.40, 0.85),
    (0.20, 0.80, 0.80), (0.95, 0.50, 0.70), (0.60, 0.45, 0.30), (0.55, 0.75, 0.20), (0.50, 0.50, 0.95),
)


def default_colour(index: int) -> tuple[float, float, float]:
    """Palette colour for the ``index``-th label (0-based, cycling)."""
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class LabelInfo:
    """One label of a labelmap.

    Attributes:
        value: voxel value in the labelmap (1..32767; 0 is background).
        name: display name, e.g. "Nodule".
        colour: (r, g, b), each 0..1.
        terminology: ``{"category": concept, "type": concept | None}`` with concepts as
            ``{"scheme", "code", "meaning"}``.
    """

    value: int
    name: str
    colour: tuple[float, float, float]
    terminology: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {**asdict(self), "colour": [float(c) for c in self.colour]}

    @classmethod
    def from_dict(cls, data: dict) -> LabelInfo:
        """Validate and build from :meth:`as_dict` output.

        Raises:
            ValueError: For a value outside 1..32767 or a colour outside 0..1.
        """
        value, colour = int(data["value"]), tuple(float(c) for c in data["colour"])
        if not 1 <= value <= np.iinfo(np.int16).max:
            raise ValueError(f"Label value {value} of \"{data['name']}\" is outside 1..32767 (0 is background).")
        if len(colour) != 3 or not all(0.0 <= c <= 1.0 for c in colour):
            raise ValueError(f"Colour {list(colour)} of \"{data['name']}\" must be three numbers in 0..1.")
        return cls(value, str(data["name"]), colour, dict(data.get("terminology") or {}))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """A labelmap on an input volume's grid and what its values mean.

    Attributes:
        labelmap: (I, J, K) int16, 0 = background (also outside the model's field of view).
        ijk_to_ras: the input volume's 4 x 4 IJK->RAS matrix (the labelmap's geometry).
        labels: the non-background labels.
        source: ``"head"`` (trained decoder) or ``"zero-shot"`` (patch heatmaps).
        description: one line for the user, e.g. "zero-shot, 16 mm resolution".
        metadata: provenance (encoder identity, validation Dice, ...), JSON-serialisable.
    """

    labelmap: np.ndarray
    ijk_to_ras: TypeAffine
    labels: list[LabelInfo]
    source: str
    description: str
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The content of ``segmentation.json``."""
        return {
            "source": self.source, "description": self.description, "background_value": 0,
            "labels": [label.as_dict() for label in self.labels], "metadata": self.metadata,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


@dataclass(frozen=True)
class HeadMetadata:
    """Everything in ``head.json``; see the module docstring."""

    labels: list[LabelInfo]
    encoder: dict  # model_id, revision, sha256
    preprocessing: dict  # model_shape, patch_size, spacing_mm
    architecture: dict  # HeadConfig.as_dict()
    training: dict = field(default_factory=dict)
    validation_dice: dict = field(default_factory=dict)  # label name -> Dice or None
    format_version: int = 1
    postprocessing: dict = field(default_factory=dict)  # label value (str) -> {"max_elongation": x, ...}

    def as_dict(self) -> dict:
        data = asdict(self)
        data["labels"] = [label.as_dict() for label in self.labels]
        data["format_version"] = FORMAT_VERSION if self.postprocessing else 1  # older readers refuse the rules
        return data

    @classmethod
    def from_dict(cls, data: dict, source: Path) -> HeadMetadata:
        """Build from ``head.json`` content.

        Raises:
            RuntimeError: For missing sections, a newer format or invalid labels.
        """
        missing = [key for key in ("labels", "encoder", "preprocessing", "architecture") if key not in data]
        if missing or "sha256" not in data.get("encoder", {}):
            lacking = missing or ["encoder.sha256"]
            message = f'"{source}" lacks {lacking}: it is not a complete {HEAD_METADATA}. Re-train the head.'
            raise RuntimeError(message)
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            message = (
                f'"{source}" has format version {data["format_version"]}; this version reads up to'
                f" {FORMAT_VERSION}. Update COLIPRISlicer."
            )
            raise RuntimeError(message)
        try:
            labels = [LabelInfo.from_dict(label) for label in data["labels"]]
        except (KeyError, TypeError, ValueError) as error:
            raise RuntimeError(f'Invalid label in "{source}": {error}') from error
        rules = data.get("postprocessing", {})
        values = {str(label.value) for label in labels}
        for value, rule in rules.items():
            if value not in values or not isinstance(rule, dict) or not isinstance(rule.get("max_elongation"),
                                                                                  (int, float)):
                message = (f'Invalid postprocessing rule for label {value!r} in "{source}": {rule!r}. A rule names one'
                           ' of the head\'s label values and a number "max_elongation"; fix or remove it.')
                raise RuntimeError(message)
        return cls(labels, data["encoder"], data["preprocessing"], data["architecture"], data.get("training", {}),
                   data.get("validation_dice", {}), int(data.get("format_version", 1)), rules)


class TypeSavableHead(Protocol):
    """What :func:`save_head` writes: a decoder network and its ``head.json`` metadata
    (``segmentation_head.SegmentationHead``)."""

    network: Any  # torch.nn.Module
    metadata: HeadMetadata


def save_head(head: TypeSavableHead, folder: TypePath) -> Path:
    """Write ``head.safetensors`` and ``head.json`` of a ``SegmentationHead`` into a folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.network.state_dict().items()}
    save_file(state, str(folder / HEAD_WEIGHTS))
    write_head_metadata(head.metadata, folder)
    return folder


def write_head_metadata(metadata: HeadMetadata, folder: Path) -> None:
    """Write ``head.json`` whole (atomically), e.g. after its rules were chosen."""
    write_text_atomically(Path(folder) / HEAD_METADATA, json.dumps(metadata.as_dict(), indent=2))


def read_head_metadata(folder: Path) -> HeadMetadata:
    """Parse ``head.json`` (see :func:`load_head` for the errors)."""
    for name in (HEAD_METADATA, HEAD_WEIGHTS):
        if not (folder / name).is_file():
            message = (
                f'"{folder / name}" not found. A head folder holds {HEAD_WEIGHTS} and {HEAD_METADATA};'
                " train one with `colipri-slicer train-seg-head`."
            )
            raise FileNotFoundError(message)
    try:
        data = json.loads((folder / HEAD_METADATA).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        message = f'"{folder / HEAD_METADATA}" is corrupt ({error}). Copy the head folder again or re-train it.'
        raise RuntimeError(message) from error
    if not isinstance(data, dict):
        message = f'"{folder / HEAD_METADATA}" is corrupt (expected a JSON object). Copy it again or re-train.'
        raise RuntimeError(message)
    return HeadMetadata.from_dict(data, folder / HEAD_METADATA)


def check_encoder(metadata: HeadMetadata, folder: Path, engine: Engine) -> None:
    identity = engine.identity
    trained, loaded = metadata.encoder["sha256"], identity.sha256
    if trained != loaded:
        message = (
            f'Segmentation head "{folder}" was trained on encoder {metadata.encoder.get("model_id")}'
            f" (sha256 {trained}), but the loaded model is {identity.model_id} (sha256 {loaded})."
            " Its features differ, so the head would give wrong labels: load the model the head was"
            " trained on, or train a head for this model with `colipri-slicer train-seg-head`."
        )
        raise RuntimeError(message)
    head_patch = tuple(metadata.preprocessing.get("patch_size", ()))
    if head_patch != tuple(engine.loaded.patch_size):
        message = f'Head "{folder}" expects patch size {head_patch}, the model has {engine.loaded.patch_size}.'
        raise RuntimeError(message)


def read_weights(path: Path, network) -> dict:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for corrupt files
        message = f'Cannot read "{path}" ({error}): the file is corrupt or incomplete. Copy it again or re-train.'
        raise RuntimeError(message) from error
    expected = network.state_dict()
    wrong = [name for name in expected if name not in state or state[name].shape != expected[name].shape]
    unexpected = [name for name in state if name not in expected]
    if wrong or unexpected:
        message = (
            f'"{path}" does not match the architecture in {HEAD_METADATA}: {len(wrong)} missing or'
            f" differently shaped tensor(s) {wrong[:3]}, {len(unexpected)} unexpected {unexpected[:3]}."
        )
        raise RuntimeError(message)
    return state


def labelled_box(labelmap_ijk: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The (I, J, K) slices of the smallest box holding every labelled voxel, or None for none.

    Two passes over the (K, J, I) view, both along memory for the engine's Fortran-ordered maps."""
    kji = np.transpose(labelmap_ijk, (2, 1, 0))
    slabs = np.flatnonzero(kji.any(axis=(1, 2)))
    if slabs.size == 0:
        return None
    k0, k1 = int(slabs[0]), int(slabs[-1]) + 1
    footprint = kji[k0:k1].any(axis=0)  # (J, I)
    rows, columns = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    return slice(int(columns[0]), int(columns[-1]) + 1), slice(int(rows[0]), int(rows[-1]) + 1), slice(k0, k1)


def write_segmentation(result: SegmentationResult, volume: Volume, out_dir: TypePath) -> tuple[Path, Path]:
    """Write ``segmentation.nii.gz`` (the input's exact geometry) and ``segmentation.json``.

    Args:
        result: a labelmap on ``volume``'s grid.
        volume: the input ``Volume`` the result was computed for.
        out_dir: output folder (created).

    Returns:
        Paths of the image and the JSON file.

    Raises:
        ValueError: If the result's shape or matrix differs from the volume's.
    """
    import SimpleITK as sitk

    from COLIPRISlicerLib.geometry import array_to_sitk

    same_matrix = np.allclose(result.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=1e-9)
    if result.labelmap.shape != volume.shape or not same_matrix:
        message = (
            f"Segmentation of shape {result.labelmap.shape} is not on the grid of volume"
            f' "{volume.name}" {volume.shape}; pass the volume it was computed for.'
        )
        raise ValueError(message)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path, json_path = out_dir / SEGMENTATION_IMAGE, out_dir / SEGMENTATION_JSON
    sitk.WriteImage(array_to_sitk(result.labelmap.astype(np.int16), volume.ijk_to_ras), str(image_path), True)
    json_path.write_text(result.to_json())
    return image_path, json_path
