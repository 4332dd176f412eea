"""Shared fixtures: paths to ../shared/data, tiny random COLIPRI models, synthetic volumes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))

SHARED_DATA = REPO.parent / "shared" / "data"
TCIA_SERIES = SHARED_DATA / "ct" / "tcia_lung_pet_ct_dx_A0001" / "series_5mm"
TCIA_BOXES = SHARED_DATA / "ct" / "tcia_lung_pet_ct_dx_A0001" / "tumour_boxes"
RAS_NIFTI = SHARED_DATA / "ct" / "totalsegmentator" / "example_ct.nii.gz"
MR_NIFTI = SHARED_DATA / "ct" / "totalsegmentator" / "example_mr_sm.nii.gz"
#: The CXR-BERT vocabulary, as bundled with the teaching model (the same file as
#: ../shared/data/cxrbert/vocab.txt; test_repository checks it), so tests that only need
#: the vocabulary run without ../shared.
CXR_BERT_VOCAB = REPO / "Resources" / "Models" / "phantom" / "vocab.txt"
SHARED_CXR_BERT_VOCAB = SHARED_DATA / "cxrbert" / "vocab.txt"
LABELS_18 = SHARED_DATA / "labels" / "ct_rate_18_abnormalities.txt"


def require(path: Path) -> Path:
    """Skip the calling test with a reason when shared test data is absent."""
    if not path.exists():
        pytest.skip(f"test data not found: {path} (clone ../shared beside the repository)")
    return path


@pytest.fixture(scope="session", autouse=True)
def temporary_user_cache(tmp_path_factory) -> Path:
    """Point every user cache the engine or the hub could write (ours, XDG, Hugging Face) at a
    session temporary folder, so that no test writes to ~/.cache; restored after the session."""
    root = tmp_path_factory.mktemp("user_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("COLIPRISLICER_CACHE", str(root / "colipri-slicer"))
    patch.setenv("XDG_CACHE_HOME", str(root))
    patch.setenv("HF_HOME", str(root / "huggingface"))
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A randomly initialised small COLIPRI model (64^3 input at 6 mm, 8^3 patches) with
    the real CXR-BERT vocabulary, written in the model-folder format."""
    from COLIPRISlicerLib.model.folder import SmallModelSpec, write_small_model

    vocab = require(CXR_BERT_VOCAB)
    folder = tmp_path_factory.mktemp("tiny_model")
    return write_small_model(folder, vocab, SmallModelSpec(seed=1234), extra={"model_id": "tests/tiny-random"})


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_folder):
    """The tiny model loaded through the engine's own loader (fp32, CPU)."""
    from COLIPRISlicerLib.model.loading import load_model

    return load_model(str(tiny_model_folder), device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def phantom_sample(tiny_loaded):
    """Training sample of phantom 3 at coarse geometry on the tiny model's grid."""
    from COLIPRISlicerLib.teaching.dataset import make_sample

    return make_sample(3, tiny_loaded.image_transform, tiny_loaded.patch_size, coarse=True)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_folder):
    """One CPU engine over the tiny model for the whole session (memory cache only)."""
    from COLIPRISlicerLib.encoding.engine import Engine

    return Engine(str(tiny_model_folder), device="cpu", precision="fp32")


def synthetic_chest(shape=(60, 50, 40), spacing=(3.0, 3.5, 5.0), seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """A crude chest-like int16 volume (air, body, two lungs) with an anisotropic RAS matrix."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    array = np.full(shape, -1000.0)
    array[(i / 0.9) ** 2 + (j / 0.7) ** 2 < 1] = 40.0
    for centre in (-0.4, 0.4):
        array[((i - centre) / 0.3) ** 2 + (j / 0.45) ** 2 + (k / 0.9) ** 2 < 1] = -850.0
    array += rng.normal(0, 20, shape)
    ijk_to_ras = np.diag([*spacing, 1.0])
    ijk_to_ras[:3, 3] = [-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, -100.0]
    return array.astype(np.int16), ijk_to_ras


def official_pipeline(model_folder: Path):
    """colipri's own ``ZeroShotImageClassificationPipeline`` over a model folder (the reference)."""
    import colipri
    import yaml
    from omegaconf import OmegaConf

    config = yaml.safe_load((model_folder / "config.yaml").read_text())
    config["processor"]["tokenizer"]["vocab"] = str(model_folder / "vocab.txt")
    model = colipri.get_model(model_folder / "model.safetensors", config=OmegaConf.create(config["model"]))
    processor = colipri.get_processor(config=OmegaConf.create(config["processor"]))
    return colipri.ZeroShotImageClassificationPipeline(model, processor)


def write_oblique_permuted_copy(source: Path, destination: Path, angle_deg: float = 20.0) -> Path:
    """Re-store a scan with its array axes permuted and flipped and its direction rotated
    (oblique), as another scanner or tool might write it."""
    import SimpleITK as sitk

    from COLIPRISlicerLib.io.volume import load_volume

    volume = load_volume(source)
    permuted = np.flip(np.transpose(volume.array, (1, 0, 2)), axis=2)
    theta = np.deg2rad(angle_deg)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    reorder = np.zeros((4, 4))
    reorder[3, 3] = 1
    reorder[0, 1] = reorder[1, 0] = 1
    reorder[2, 2] = -1
    reorder[2, 3] = volume.shape[2] - 1
    ijk_to_ras = rotation @ volume.ijk_to_ras @ reorder
    from COLIPRISlicerLib.export.outputs import write_volume

    write_volume(np.ascontiguousarray(permuted), ijk_to_ras, destination)
    assert sitk.ReadImage(str(destination)).GetSize() == permuted.shape
    return destination
