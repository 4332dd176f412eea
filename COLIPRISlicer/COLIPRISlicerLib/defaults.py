"""Constants shared by the engine: model identity, hub revisions, resource paths."""

from __future__ import annotations

import os
from pathlib import Path

#: Hugging Face repository of the released COLIPRI weights.
COLIPRI_REPO_ID = "microsoft/colipri"
#: Revision of ``COLIPRI_REPO_ID`` that downloads use: the branch ``main``, not a commit (no commit of
#: the weights could be verified where this was built). Pin one with the
#: ``COLIPRISLICER_COLIPRI_REVISION`` environment variable; every output records the sha256 it used.
COLIPRI_REVISION = os.environ.get("COLIPRISLICER_COLIPRI_REVISION", "main")
WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.yaml"

#: Text backbone and tokenizer of COLIPRI (CXR-BERT), pinned as in colipri's own configs.
CXR_BERT_REPO_ID = "microsoft/BiomedVLP-CXR-BERT-specialized"
CXR_BERT_REVISION = "5157bdba1437a3aed316dacb1a5b68edf96b9902"

#: Model spec that selects the released COLIPRI weights.
DEFAULT_MODEL = COLIPRI_REPO_ID
#: Model spec that selects the bundled, untrained demonstration model.
DEMO_MODEL = "demo"
#: Model spec that selects the bundled synthetic teaching model (trained on phantoms).
PHANTOM_MODEL = "phantom"

#: Most text embeddings kept in memory (VoxTell keeps 256).
TEXT_CACHE_SIZE = 1024
#: Most image encodings kept in memory (each is about 90 MB for the full model).
IMAGE_CACHE_SIZE = 4
#: Size bound of the on-disk encoding cache (least recently used encodings are removed first).
DISK_CACHE_MAX_BYTES = 2 * 10**9
#: Longest prompt accepted, in tokens (BERT's position limit).
MAX_PROMPT_TOKENS = 512

HU_MIN_EXPECTED = -1200.0
HU_MAX_EXPECTED = 4000.0


def resources_dir() -> Path:
    """Folder holding catalogues, sentence banks and bundled models.

    Looks, in order, at ``$COLIPRISLICER_RESOURCES``, the copy packaged inside a wheel,
    the layout of a built Slicer extension (``qt-scripted-modules/Resources``) and the
    layout of a source checkout (``<repo>/Resources``).

    Raises:
        FileNotFoundError: If none of these folders exists.
    """
    here = Path(__file__).resolve().parent
    candidates = [
        Path(os.environ["COLIPRISLICER_RESOURCES"]) if "COLIPRISLICER_RESOURCES" in os.environ else None,
        here / "Resources",
        here.parent / "Resources",
        here.parent.parent / "Resources",
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "Catalogues").is_dir():
            return candidate
    message = (
        "COLIPRISlicer resources not found (looked for a Resources/Catalogues folder next to"
        f' "{here}"). Reinstall the package or set COLIPRISLICER_RESOURCES.'
    )
    raise FileNotFoundError(message)


def phantom_model_folder() -> Path:
    """Where the bundled synthetic teaching model (spec ``phantom``) lives."""
    return resources_dir() / "Models" / "phantom"


def user_cache_dir() -> Path:
    """Folder for the on-disk embedding cache and the demo model (``$COLIPRISLICER_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "colipri-slicer"
    return Path(os.environ.get("COLIPRISLICER_CACHE", default))


def embedding_cache_dir() -> Path:
    """The default on-disk encoding cache (CLI ``--cache-dir``, the module's "Keep encodings")."""
    return user_cache_dir() / "embeddings"
