"""Write model folders (``model.safetensors`` + ``config.yaml`` + ``vocab.txt``).

Used for small COLIPRI-architecture models: the untrained demo model, the tests' tiny
random models, and models trained by this project. The architecture is colipri's own
(Primus image encoder, BERT text encoder, attention pools), only smaller.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from COLIPRISlicerLib.defaults import CONFIG_FILENAME, WEIGHTS_FILENAME
from COLIPRISlicerLib.io.atomic import write_text_atomically
from COLIPRISlicerLib.model.text_config import bert_backbone_config, bert_tokenizer_config
from COLIPRISlicerLib.types import TypePath


@dataclass(frozen=True)
class SmallModelSpec:
    """Sizes of a small COLIPRI-architecture model (Primus needs (embed/heads)/1.5 % 4 == 0)."""

    input_size: int = 64
    spacing_mm: float = 6.0
    image_embed_dim: int = 48
    image_depth: int = 2
    image_heads: int = 2
    projection_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 64
    seed: int = 0
    pool_heads: int | None = None  # image attention pool; default image_heads
    drop_path_rate: float | None = None  # Primus stochastic depth in training; default colipri's


def colipri_config_loader():
    """colipri 0.1.3's private ``checkpoint._load_config`` (resolves its packaged hydra config offline).

    Raises:
        RuntimeError: the installed colipri lacks it (another version than the pinned one).
    """
    import colipri.checkpoint

    loader = getattr(colipri.checkpoint, "_load_config", None)
    if loader is None:
        from importlib.metadata import version

        raise RuntimeError(f"colipri {version('colipri')} has no checkpoint._load_config, which building a small model"
                           " needs (colipri 0.1.3 has it); install colipri==0.1.3, the version this project pins.")
    return loader


def small_model_config(spec: SmallModelSpec, vocab_size: int) -> dict:
    """Fully resolved ``{"model": ..., "processor": ...}`` config with ``./vocab.txt``."""
    from omegaconf import OmegaConf

    _load_config = colipri_config_loader()

    overrides = [
        f"input_size={spec.input_size}", f"spacing={spec.spacing_mm}",
        f"image_embed_dim={spec.image_embed_dim}", f"projection_dim={spec.projection_dim}",
        f"model.image_encoder.backbone.eva_depth={spec.image_depth}",
        f"model.image_encoder.backbone.eva_numheads={spec.image_heads}",
        f"model.image_encoder.pooler.num_heads={spec.pool_heads or spec.image_heads}",
        f"model.text_encoder.pooler.num_heads={spec.text_heads}",
    ]
    if spec.drop_path_rate is not None:
        overrides.append(f"model.image_encoder.backbone.drop_path_rate={spec.drop_path_rate}")
    config = OmegaConf.to_container(_load_config(overrides=overrides), resolve=True)
    config["model"]["text_encoder"]["backbone"] = bert_backbone_config({
        "vocab_size": vocab_size, "hidden_size": spec.projection_dim, "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads, "intermediate_size": spec.text_intermediate,
    })
    config["processor"]["tokenizer"] = bert_tokenizer_config("./vocab.txt")
    return {key: config[key] for key in ("model", "processor")}


def write_small_model(folder: TypePath, vocab_path: TypePath, spec: SmallModelSpec = SmallModelSpec(),
                      *, extra: dict | None = None) -> Path:
    """Build a randomly initialised small model (seeded) and write it as a model folder.

    Args:
        folder: output folder (created).
        vocab_path: a BERT ``vocab.txt`` (e.g. CXR-BERT's), copied into the folder.
        spec: sizes.
        extra: stored under the ``colipri_slicer`` key of config.yaml (model_id, label, ...).
    """
    import torch
    import yaml
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab_path, folder / "vocab.txt")
    vocab_size = sum(1 for _ in open(folder / "vocab.txt", encoding="utf-8"))
    config = small_model_config(spec, vocab_size)
    resolved = OmegaConf.create(config["model"])
    torch.manual_seed(spec.seed)
    model = instantiate(resolved).eval()
    save_model(model, str(folder / WEIGHTS_FILENAME))
    if extra:
        config["colipri_slicer"] = extra
    (folder / CONFIG_FILENAME).write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def update_model_record(folder: TypePath, **entries) -> None:
    """Set entries of the ``colipri_slicer`` record in a model folder's config.yaml (the rest kept),
    written whole or not at all.

    Raises:
        FileNotFoundError: if the folder has no config.yaml.
    """
    import yaml

    path = Path(folder) / CONFIG_FILENAME
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document.setdefault("colipri_slicer", {}).update(entries)
    write_text_atomically(path, yaml.safe_dump(document, sort_keys=False))
