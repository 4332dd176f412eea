"""Load a COLIPRI model and its processor from a model spec.

Specs:
    ``microsoft/colipri`` (default; ``owner/name@revision`` also accepted): weights from the
        Hugging Face cache at a pinned revision; the text backbone is a plain
        ``transformers.BertModel`` built from CXR-BERT's config (no remote code).
    a folder: ``model.safetensors`` + optional ``config.yaml`` (colipri's full config schema
        with top-level ``model:`` and ``processor:``; strings starting with ``./`` are paths
        relative to the folder). Without ``config.yaml`` the real COLIPRI config is assumed
        and CXR-BERT's ``config.json``/``vocab.txt`` are taken from the folder or the cache.
    ``demo``: the bundled untrained demonstration model (see ``demo_model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from COLIPRISlicerLib import defaults
from COLIPRISlicerLib.io.atomic import write_text_atomically
from COLIPRISlicerLib.model.devices import select_device, select_precision
from COLIPRISlicerLib.model.text_config import colipri_config
from COLIPRISlicerLib.types import TypePath, TypeStatusCallback

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelIdentity:
    """What was loaded, recorded in every output."""

    model_id: str
    revision: str | None
    sha256: str
    source: str  # "hub", "folder" or "demo"
    weights_path: str
    device: str
    dtype: str
    label: str = ""  # e.g. "untrained demo model — not COLIPRI"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelExtras:
    """What a model folder brings besides its weights (config.yaml ``colipri_slicer`` record).

    Attributes:
        thresholds: {finding name: calibrated likelihood threshold}.
        segmentation_head: a head folder shipped inside the model folder, if any.
        anatomy_weight: calibrated exponent of the anatomy prior in snippet localisation
            (``localization.localize``); None: the module default.
        not_learned: {finding name: why calibration found it not learned} (no present/absent call).
    """

    thresholds: dict = field(default_factory=dict)
    segmentation_head: Path | None = None
    anatomy_weight: float | None = None
    not_learned: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A colipri ``Model`` in eval mode plus what is needed to feed it."""

    model: object  # colipri.model.multimodal.Model
    image_transform: object  # tio.Compose
    tokenizer: object  # transformers.BertTokenizer
    identity: ModelIdentity
    processor_signature: str
    dense_pooler: object = field(repr=False, default=None)  # nn.Sequential of 1x1x1 convs

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.model.patch_size)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _ResolvedSpec:
    model_id: str
    revision: str | None
    source: str
    weights: Path
    config: dict  # {"model": ..., "processor": ...} plain containers, paths resolved
    label: str = ""
    extras: ModelExtras = field(default_factory=ModelExtras)


@dataclass(frozen=True)
class ModelDescription:
    """What identifies a model and its preprocessing, known without building it (cheap).

    Attributes:
        identity: as recorded in every output.
        processor_signature: hash of the image transform config (part of every cache key).
        temperature: the checkpoint's ``softmax_temperature`` (read from the weights file alone).
    """

    resolved: _ResolvedSpec
    identity: ModelIdentity
    processor_signature: str
    temperature: float
    device: object = None


def describe_model(spec: str = defaults.DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto",
                   status_callback: TypeStatusCallback | None = None) -> ModelDescription:
    """Resolve a spec (downloading when needed) and describe it without building the model.

    Args and Raises: as :func:`load_model`.
    """
    notify = status_callback or (lambda message: None)
    resolved = resolve_spec(spec, notify)
    torch_device = select_device(device)
    dtype = select_precision(precision, torch_device)
    identity = ModelIdentity(resolved.model_id, resolved.revision, file_sha256(resolved.weights), resolved.source,
                             str(resolved.weights), str(torch_device), dtype, resolved.label)
    signature = hashlib.sha256(json.dumps(resolved.config["processor"]["image_transform"], sort_keys=True,
                                          default=str).encode()).hexdigest()[:16]
    temperature = _checkpoint_temperature(resolved.weights, resolved.config["model"].get("temperature", 1))
    return ModelDescription(resolved, identity, signature, temperature, torch_device)


def _checkpoint_temperature(weights: Path, default: float) -> float:
    """``softmax_temperature`` from the safetensors file (the config's value when absent)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as file:
            if "softmax_temperature" in file.keys():
                return float(file.get_tensor("softmax_temperature"))
    except Exception as error:  # safetensors raises several types for corrupt files
        message = f'Cannot read weights "{weights}" ({error}). The file is corrupt or incomplete: download it again.'
        raise RuntimeError(message) from error
    return float(default)


def load_model(spec: str = defaults.DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto",
               status_callback: TypeStatusCallback | None = None,
               description: ModelDescription | None = None) -> LoadedModel:
    """Load a model spec onto a device.

    Args:
        spec: ``microsoft/colipri``, a model folder, ``phantom`` (the bundled synthetic
            teaching model) or ``demo`` (untrained).
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``auto`` (bf16 autocast for the image encoder where the hardware
            supports it), ``bf16`` or ``fp32``; the text encoder follows (bf16 autocast).
        description: the spec already described by :func:`describe_model` (skips that step).

    Raises:
        RuntimeError: weights not available offline, or a checkpoint that does not match.
        FileNotFoundError: a model folder without ``model.safetensors``.
    """
    start = time.perf_counter()
    if description is None:
        description = describe_model(spec, device=device, precision=precision, status_callback=status_callback)
    if status_callback is not None:
        status_callback("Loading model")
    model = _build_and_load(description.resolved)
    model.to(description.device)
    loaded = _assemble(model, description)
    logger.info("Loaded %s in %.2f s (%s, %s).", description.identity.model_id, time.perf_counter() - start,
                description.device, description.identity.dtype)
    return loaded


def _assemble(model, description: ModelDescription) -> LoadedModel:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    resolved = description.resolved
    processor_config = OmegaConf.create(resolved.config["processor"])
    tokenizer = instantiate(processor_config["tokenizer"])
    dense_pooler = model.image_encoder.pooler.to_dense().eval()
    return LoadedModel(model, build_image_transform(resolved.config["processor"]), tokenizer, description.identity,
                       description.processor_signature, dense_pooler)


def build_image_transform(processor_config: dict):
    """The processor's TorchIO transform (a ``tio.Compose``) from its config: no weights needed, so
    workers that only preprocess never build the model."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.create(processor_config)["image_transform"])


def resolve_spec(spec: TypePath, notify: TypeStatusCallback) -> _ResolvedSpec:
    """Turn a spec into weights + fully resolved config (downloading when needed)."""
    text = str(spec)
    if text == defaults.DEMO_MODEL:
        from COLIPRISlicerLib.model.demo import ensure_demo_model

        return _resolve_folder(ensure_demo_model(), source="demo")
    if text == defaults.PHANTOM_MODEL:
        return _resolve_folder(_bundled_phantom_model(), source="phantom")
    if Path(text).expanduser().exists():
        return _resolve_folder(Path(text).expanduser())
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _resolve_hub(text, notify)
    message = (
        f'Model "{text}" is neither an existing model folder nor a Hugging Face repository id.'
        f' Use "{defaults.COLIPRI_REPO_ID}", "{defaults.DEMO_MODEL}" or a folder holding model.safetensors.'
    )
    raise FileNotFoundError(message)


def _resolve_folder(folder: Path, source: str = "folder") -> _ResolvedSpec:
    weights = folder / defaults.WEIGHTS_FILENAME
    if folder.is_file():
        raise FileNotFoundError(f'Model "{folder}" is a file; a model is the folder holding {defaults.WEIGHTS_FILENAME}'
                                f' (and config.yaml): pass "{folder.parent}".')
    if not weights.is_file():
        message = (
            f'Model folder "{folder}" has no {defaults.WEIGHTS_FILENAME}. Download it from'
            f" https://huggingface.co/{defaults.COLIPRI_REPO_ID} (Files tab) into that folder."
        )
        raise FileNotFoundError(message)
    config_path = folder / defaults.CONFIG_FILENAME
    if config_path.is_file():
        config = _load_folder_config(config_path)
    else:
        config = _cxr_bert_config(folder)
    meta = config.pop("colipri_slicer", {}) or {}
    model_id = str(meta.get("model_id", folder.resolve()))
    head = folder / "segmentation_head"
    weight = (meta.get("localization") or {}).get("anatomy_weight")
    extras = ModelExtras({str(k): float(v) for k, v in (meta.get("thresholds") or {}).items()},
                         head if head.is_dir() else None, None if weight is None else float(weight),
                         {str(k): str(v) for k, v in (meta.get("not_learned") or {}).items()})
    return _ResolvedSpec(model_id, meta.get("revision"), source, weights, config, str(meta.get("label", "")), extras)


def _bundled_phantom_model() -> Path:
    folder = defaults.phantom_model_folder()
    if not (folder / defaults.WEIGHTS_FILENAME).is_file():
        message = (
            f'The phantom teaching model is missing from "{folder}". Reinstall COLIPRISlicer, or train it'
            " with `colipri-slicer train-phantom --out <folder>` and pass that folder as the model."
        )
        raise FileNotFoundError(message)
    return folder


def _load_folder_config(path: Path) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())
        raise ValueError(f'"{path}" is not valid YAML ({detail}). Restore the model folder\'s config.yaml or'
                         " download the model again.") from None
    if not isinstance(config, dict):
        raise ValueError(f'"{path}" holds a {type(config).__name__}, not colipri\'s config mapping; restore it.')
    missing = [key for key in ("model", "processor") if key not in config]
    if missing:
        message = (
            f'"{path}" lacks the top-level section(s) {missing}. It must follow colipri\'s config'
            " schema with fully resolved `model:` and `processor:` sections."
        )
        raise ValueError(message)
    return _resolve_relative_paths(config, path.parent)


def _resolve_relative_paths(node, folder: Path):
    if isinstance(node, dict):
        return {key: _resolve_relative_paths(value, folder) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve_relative_paths(value, folder) for value in node]
    if isinstance(node, str) and node.startswith("./"):
        return str((folder / node).resolve())
    return node


def _cxr_bert_config(folder: Path | None) -> dict:
    """The real COLIPRI config, with CXR-BERT's ``config.json``/``vocab.txt`` from ``folder`` where it
    holds them, else from the hub (or its cache)."""
    return colipri_config(_cxr_bert_file(folder, "config.json"), _cxr_bert_file(folder, "vocab.txt"))


def _cxr_bert_file(folder: Path | None, name: str) -> Path:
    if folder is not None and (folder / name).is_file():
        return folder / name
    return _hub_file(defaults.CXR_BERT_REPO_ID, name, defaults.CXR_BERT_REVISION)


def _resolve_hub(text: str, notify: TypeStatusCallback) -> _ResolvedSpec:
    repo_id, _, revision = text.partition("@")
    revision = revision or (defaults.COLIPRI_REVISION if repo_id == defaults.COLIPRI_REPO_ID else "main")
    notify(f"Downloading weights of {repo_id} (first use only)")
    weights = _hub_file(repo_id, defaults.WEIGHTS_FILENAME, revision)
    config = _cxr_bert_config(None)
    return _ResolvedSpec(repo_id, revision, "hub", weights, config)


def _hub_file(repo_id: str, filename: str, revision: str) -> Path:
    """Download (or find in the cache) one file; honours ``HF_HUB_OFFLINE``."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except Exception as error:  # noqa: BLE001 - every hub failure gets the same advice
        message = (
            f'Could not get "{filename}" of {repo_id}@{revision} from the Hugging Face hub or its'
            f" cache ({type(error).__name__}: {error}).\nOffline? Either pass a model folder"
            f" (--model /path/to/folder holding {defaults.WEIGHTS_FILENAME}, plus config.json and"
            f" vocab.txt of {defaults.CXR_BERT_REPO_ID}), or pre-download on a connected machine:\n"
            f"  hf download {defaults.COLIPRI_REPO_ID} {defaults.WEIGHTS_FILENAME}\n"
            f"  hf download {defaults.CXR_BERT_REPO_ID} config.json vocab.txt --revision {defaults.CXR_BERT_REVISION}\n"
            "and copy the Hugging Face cache folder (~/.cache/huggingface/hub) to this machine."
        )
        raise RuntimeError(message) from error


def _build_and_load(resolved: _ResolvedSpec):
    """Instantiate on the meta device and fill from safetensors, checking every key."""
    import torch
    from accelerate import init_empty_weights
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with init_empty_weights():
            model = instantiate(OmegaConf.create(resolved.config["model"]))
    finally:
        transformers_logging.set_verbosity(verbosity)
    try:
        state = load_file(str(resolved.weights), device="cpu")
    except Exception as error:  # safetensors raises several types for corrupt files
        message = f'Cannot read weights "{resolved.weights}" ({error}). The file is corrupt or incomplete: download it again.'
        raise RuntimeError(message) from error
    result = model.load_state_dict(state, strict=False, assign=True)
    _check_keys(model, result.missing_keys, result.unexpected_keys, resolved.weights)
    return model.eval().to(torch.float32)


def _check_keys(model, missing: list[str], unexpected: list[str], path: Path) -> None:
    still_empty = [name for name, param in model.named_parameters() if param.is_meta]
    if unexpected or still_empty:
        message = (
            f'Checkpoint "{path}" does not match the model architecture: {len(unexpected)} unexpected'
            f" key(s) {unexpected[:5]}, {len(still_empty)} parameter(s) not in the checkpoint"
            f" {still_empty[:5]}. Check that config.yaml describes these weights."
        )
        raise RuntimeError(message)
    if missing:
        logger.debug("Buffers not in the checkpoint (kept from the constructor): %s", missing)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised on disk by (path, size, mtime)."""
    stat = path.stat()
    memo_path = defaults.user_cache_dir() / "sha256.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = _read_json(memo_path)
    if key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 22), b""):
                digest.update(chunk)
        memo[key] = digest.hexdigest()
        _write_json(memo_path, memo)
    return memo[key]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    try:
        write_text_atomically(path, json.dumps(data))
    except OSError as error:
        logger.debug("Could not write %s: %s", path, error)