"""Settings that reach the engine: model source, device choice, offline mode, and the
folders downloads land in (to show, open and clear them). No Slicer or Qt import here.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from COLIPRISlicerLib import defaults

logger = logging.getLogger(__name__)

MODEL_SOURCES = ("hub", "folder", "phantom", "demo")
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "fp32", "bf16")
#: Free GPU memory below which "auto"/"cuda" falls back to the CPU with a warning. A
#: conservative estimate for COLIPRI's image encoder at 192^3 in bf16; an out-of-memory
#: error later still falls back to the CPU inside the engine.
MIN_FREE_GPU_GIB = 4.0


#: Settings kept across Slicer sessions (QSettings under ``COLIPRISlicer/``), with their choices.
SETTINGS_CHOICES = {"modelSource": MODEL_SOURCES, "device": DEVICES, "precision": PRECISIONS,
                    "modelFolder": None, "offline": None, "diskCache": None, "indexFolder": None}
#: Settings that hold a folder ("" when none was chosen).
PATH_SETTINGS = ("modelFolder", "indexFolder")


def settings_to_strings(settings) -> dict[str, str]:
    """The persistent settings of a settings object (attribute per key) as strings."""
    return {key: path_text(getattr(settings, key)) if key in PATH_SETTINGS else str(getattr(settings, key))
            for key in SETTINGS_CHOICES}


def path_text(path: str | os.PathLike | None) -> str:
    """A path as shown and stored: empty (not ".") when no folder was chosen."""
    text = str(path or "")
    return "" if text in ("", ".") else text


def settings_from_strings(stored: dict) -> dict:
    """Typed settings from stored strings; missing, empty or no-longer-valid values are left out."""
    settings = {}
    for key, value in stored.items():
        if key not in SETTINGS_CHOICES or value in (None, ""):
            continue
        choices, text = SETTINGS_CHOICES[key], str(value)
        if key in ("offline", "diskCache"):
            settings[key] = text.lower() in ("1", "true", "yes")
        elif key in PATH_SETTINGS:
            if path_text(text):
                settings[key] = path_text(text)
        elif text in choices:
            settings[key] = text
    return settings


def describe_model(model: dict) -> str:
    """One line naming a loaded model: id, revision, label, device and precision."""
    keys = ("model_id", "revision", "label", "device", "dtype")
    return " · ".join(str(model[key]) for key in keys if model.get(key))


def model_spec(source: str, folder: str | os.PathLike | None = None) -> str:
    """Engine model spec for a model source.

    Raises:
        ValueError: for an unknown source.
        FileNotFoundError: for source "folder" without an existing folder.
    """
    if source == "hub":
        return defaults.DEFAULT_MODEL
    if source == "demo":
        return defaults.DEMO_MODEL
    if source == "phantom":
        return defaults.PHANTOM_MODEL
    if source != "folder":
        raise ValueError(f'Unknown model source "{source}"; use one of {MODEL_SOURCES}.')
    if not folder or str(folder) in ("", ".") or not Path(folder).is_dir():
        message = f'Model folder "{folder}" not found. Choose a folder that holds {defaults.WEIGHTS_FILENAME}.'
        raise FileNotFoundError(message)
    return str(folder)


def resolve_device(requested: str) -> tuple[str, str | None]:
    """Device for the engine and a warning when the request cannot be met (imports torch).

    ``cuda`` without a CUDA device, or ``auto``/``cuda`` with less than ``MIN_FREE_GPU_GIB``
    free, gives ``cpu`` and a warning that says why.
    """
    if requested not in DEVICES:
        raise ValueError(f'Unknown device "{requested}"; use one of {DEVICES}.')
    if requested == "cpu":
        return "cpu", None
    import torch

    if not torch.cuda.is_available():
        if requested == "cuda":
            return "cpu", "No CUDA GPU is available to PyTorch (CPU build or no driver); running on the CPU (slower)."
        return "auto", None
    free_gib = torch.cuda.mem_get_info()[0] / 2**30
    if free_gib < MIN_FREE_GPU_GIB:
        message = (f"Only {free_gib:.1f} GiB of GPU memory is free (at least {MIN_FREE_GPU_GIB:.0f} GiB needed);"
                   " running on the CPU (slower). Close other GPU programs to use the GPU.")
        return "cpu", message
    return "cuda", None


@contextmanager
def offline_mode(offline: bool) -> Iterator[None]:
    """Forbid Hugging Face downloads while our model loads, then restore what was there.

    ``HF_HUB_OFFLINE`` is process-wide (every extension in Slicer shares it), so it is set
    only for the duration of one of our worker jobs and put back afterwards; with
    ``offline`` False nothing is touched (another extension's offline choice stands).
    """
    if not offline:
        yield
        return
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    _set_hub_constant(True)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
        _set_hub_constant(str(saved).strip().upper() in ("1", "ON", "YES", "TRUE"))


def _set_hub_constant(offline: bool) -> None:
    """``huggingface_hub`` reads the variable once at import; update its constant if imported."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = offline


def hub_cache_dir() -> Path:
    """Hugging Face's hub cache folder, as ``huggingface_hub`` resolves it."""
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_repo_folder(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def weights_folder(source: str, folder: str | os.PathLike | None = None) -> Path | None:
    """Where the weights of a model source are (or will be, after the first download); None
    for source "folder" before a folder was chosen."""
    if source == "hub":
        return hub_repo_folder(defaults.COLIPRI_REPO_ID)
    if source == "demo":
        from COLIPRISlicerLib.model.demo import demo_model_folder

        return demo_model_folder()
    if source == "phantom":
        return defaults.phantom_model_folder()
    return Path(path_text(folder)) if path_text(folder) else None


def downloaded_folders() -> list[Path]:
    """Everything this module downloaded or generated: COLIPRI and CXR-BERT in the hub cache,
    the demo models, the embeddings cache. Never a user's own model folder, and never the
    whole cache folder (``$COLIPRISLICER_CACHE`` may name a folder that holds other files)."""
    from COLIPRISlicerLib.model.demo import demo_model_folder

    candidates = [hub_repo_folder(defaults.COLIPRI_REPO_ID), hub_repo_folder(defaults.CXR_BERT_REPO_ID),
                  *demo_model_folder().parent.glob("demo-untrained-*"), defaults.embedding_cache_dir()]
    return [path for path in candidates if path.exists()]


def clear_downloads() -> list[Path]:
    """Delete :func:`downloaded_folders` (of the embeddings cache only the files the cache
    wrote); returns what was removed."""
    from COLIPRISlicerLib.encoding.cache import EncodingCache, NotACacheError

    removed = downloaded_folders()
    for path in removed:
        if path == defaults.embedding_cache_dir():
            try:
                EncodingCache(0, path).clear()
            except NotACacheError as error:
                logger.warning("%s", error)
        else:
            shutil.rmtree(path)
        logger.info("Removed %s", path)
    return removed
