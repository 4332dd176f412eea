"""Trainable snippet-localisation head on frozen COLIPRI patch embeddings (RadFinder's loss).

Depth features: the dense patch embeddings (embed_dim, gx, gy, gz) averaged over the two
in-plane axes, one vector per level along the grid axis closest to S. A learned linear
projection of the depth features and of the snippet embedding; logits = cosine similarity /
0.1; loss = cross-entropy against a one-hot target at the snippet's level blurred by a
Gaussian of sigma = 24 mm / level size (mm). Files: ``localizer.safetensors`` (weights) and
``localizer.json`` (encoder identity, grid, training summary). Training and scoring from a CSV
of (scan, snippet, true S) rows: :mod:`.localization_evaluation`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.types import TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.engine import Engine

logger = logging.getLogger(__name__)

HEAD_WEIGHTS = "localizer.safetensors"
HEAD_METADATA = "localizer.json"
HEAD_TEMPERATURE = 0.1
TARGET_SIGMA_MM = 24.0


@dataclass(frozen=True)
class LocalizationSample:
    """One (scan, snippet, true S) training or evaluation pair, reduced to what the head needs.

    Attributes:
        depth_features: (L, embed_dim) float32 tensor, see :func:`depth_features`.
        text_embedding: (embed_dim,) float32 tensor, L2-normalised snippet embedding.
        level_s_mm: (L,) S (mm) of each level's centre.
        level_mm: size (mm) of one level along S.
        s_range_mm: lowest and highest S of the scan (for the slice baselines).
    """

    scan: str
    snippet: str
    s_mm: float
    depth_features: object
    text_embedding: object
    level_s_mm: np.ndarray
    level_mm: float
    s_range_mm: tuple[float, float]

    @classmethod
    def from_encoding(cls, scan: str, snippet: str, s_mm: float, encoding: ImageEncoding, text_embedding,
                      s_range_mm: tuple[float, float] | None = None) -> LocalizationSample:
        levels, size = encoding.grid.level_s_mm(), encoding.grid.level_mm
        s_range = s_range_mm or (float(levels.min() - size / 2), float(levels.max() + size / 2))
        return cls(scan, snippet, float(s_mm), depth_features(encoding), torch.as_tensor(text_embedding).float(),
                   levels, size, s_range)

    @property
    def target_level(self) -> int | None:
        """Level holding ``s_mm``, or None when it lies outside the model's field of view."""
        level = int(np.argmin(np.abs(self.level_s_mm - self.s_mm)))
        return level if abs(self.level_s_mm[level] - self.s_mm) <= self.level_mm / 2 + 1e-6 else None


def depth_features(encoding: ImageEncoding):
    """(L, embed_dim) mean of the dense embeddings over the two in-plane axes, per S level."""
    axis = encoding.grid.depth_axis
    dense = torch.as_tensor(encoding.dense).float()
    return dense.movedim(1 + axis, 1).flatten(2).mean(dim=2).T.contiguous()


def blurred_target(num_levels: int, level: int, level_mm: float, sigma_mm: float = TARGET_SIGMA_MM):
    """(L,) one-hot at ``level`` blurred by a Gaussian of ``sigma_mm / level_mm`` levels, sum 1."""
    offsets = (torch.arange(num_levels, dtype=torch.float32) - level) / (sigma_mm / level_mm)
    weights = torch.exp(-0.5 * offsets**2)
    return weights / weights.sum()


class LocalizationHead(torch.nn.Module):
    """Projects depth features and snippet embeddings; logits = cosine / temperature.

    Args:
        embed_dim: size of COLIPRI's joint embedding (768 for the released model).
        projection_dim: output size of both projections (default ``embed_dim``, initialised
            to the identity so an untrained head is RadFinder's zero-shot baseline).
        temperature: logit temperature (RadFinder: 0.1).
        metadata: what ``localizer.json`` holds (encoder identity, grid, training summary).
    """

    def __init__(self, embed_dim: int, projection_dim: int | None = None, temperature: float = HEAD_TEMPERATURE,
                 metadata: dict | None = None):
        super().__init__()
        projection_dim = projection_dim or embed_dim
        self.image_projection = torch.nn.Linear(embed_dim, projection_dim)
        self.text_projection = torch.nn.Linear(embed_dim, projection_dim)
        if projection_dim == embed_dim:
            for layer in (self.image_projection, self.text_projection):
                torch.nn.init.eye_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
        self.embed_dim, self.projection_dim, self.temperature = embed_dim, projection_dim, temperature
        self.metadata = metadata or {}

    def forward(self, depth, text):
        """(B, L, embed_dim) depth features and (B, embed_dim) snippets -> (B, L) logits."""
        image = F.normalize(self.image_projection(depth), dim=-1)
        words = F.normalize(self.text_projection(text), dim=-1)
        return torch.einsum("blp,bp->bl", image, words) / self.temperature

    def profile(self, encoding: ImageEncoding, text_embedding) -> np.ndarray:
        """(L,) probabilities over the S levels of one encoding for one (embed_dim,) snippet."""
        depth = depth_features(encoding)
        if depth.shape[1] != self.embed_dim:
            raise ValueError(f"Head expects {self.embed_dim}-d embeddings, the encoding has {depth.shape[1]}.")
        with torch.no_grad():
            logits = self(depth[None], torch.as_tensor(text_embedding).float()[None])[0]
        return logits.softmax(dim=0).double().numpy()

    def config(self) -> dict:
        return {"embed_dim": self.embed_dim, "projection_dim": self.projection_dim, "temperature": self.temperature,
                "target_sigma_mm": TARGET_SIGMA_MM}


def fit_head(samples: Sequence[LocalizationSample], *, epochs: int = 200, seed: int = 0, learning_rate: float = 1e-3,
             batch_size: int = 64, projection_dim: int | None = None) -> tuple[LocalizationHead, dict]:
    """Train a head with RadFinder's blurred-target cross-entropy (Adam on shuffled mini-batches).

    Returns:
        The head (eval mode) and a summary: samples, scans, epochs, seed, first/last loss, seconds.

    Raises:
        ValueError: no sample with a target inside the field of view, or differing level counts.
    """
    usable = [s for s in samples if s.target_level is not None]
    if not usable:
        raise ValueError("No training pair has its S inside the model's field of view; check the s_mm/instance numbers.")
    if len({len(s.level_s_mm) for s in usable}) != 1:
        raise ValueError("Training scans have different numbers of S levels; encode them with one model.")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    depth = torch.stack([s.depth_features for s in usable])
    texts = torch.stack([s.text_embedding for s in usable])
    targets = torch.stack([blurred_target(len(s.level_s_mm), s.target_level, s.level_mm) for s in usable])
    head = LocalizationHead(depth.shape[2], projection_dim)
    optimiser = torch.optim.Adam(head.parameters(), lr=learning_rate)
    start, losses = time.perf_counter(), []
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(usable), generator=generator).split(batch_size):
            loss = -(targets[batch] * head(depth[batch], texts[batch]).log_softmax(dim=1)).sum(dim=1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(usable))
    head.eval()
    summary = {"num_samples": len(usable), "skipped_outside_field_of_view": len(samples) - len(usable),
               "num_scans": len({s.scan for s in usable}), "epochs": epochs, "seed": seed,
               "learning_rate": learning_rate, "first_epoch_loss": losses[0] if losses else None,
               "final_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - start, 3)}
    logger.info("Trained a localisation head on %d pairs in %.1f s.", len(usable), summary["seconds"])
    return head, summary


def predict_s_mm(head: LocalizationHead, sample: LocalizationSample) -> float:
    """S (mm) of the level the head ranks highest for a sample."""
    with torch.no_grad():
        logits = head(sample.depth_features[None], sample.text_embedding[None])[0]
    return float(sample.level_s_mm[int(torch.argmax(logits))])


def save_head(head: LocalizationHead, out_dir: TypePath, *, encoder: dict, grid: dict, training: dict) -> Path:
    """Write ``localizer.safetensors`` and ``localizer.json`` into ``out_dir``; returns the folder."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out_dir / HEAD_WEIGHTS))
    metadata = {"format_version": 1, "head": head.config(), "encoder": encoder, "grid": grid, "training": training}
    (out_dir / HEAD_METADATA).write_text(json.dumps(metadata, indent=2))
    head.metadata = metadata
    return out_dir


def load_head(folder: TypePath, engine: Engine | None = None) -> LocalizationHead:
    """Read a head folder; with an engine, check that it was trained on the same encoder weights.

    Raises:
        FileNotFoundError: the folder lacks ``localizer.json`` or ``localizer.safetensors``.
        RuntimeError: the head was trained on other encoder weights (sha256 differs).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (HEAD_METADATA, HEAD_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f'Localisation head file not found: "{folder / name}". Train one with train-localizer.')
    metadata = json.loads((folder / HEAD_METADATA).read_text())
    trained_on = metadata["encoder"]
    if engine is not None and trained_on.get("sha256") != engine.identity.sha256:
        message = (f'The localisation head in "{folder}" was trained on {trained_on.get("model_id")} (weights sha256'
                   f' {str(trained_on.get("sha256"))[:12]}...), but the loaded model is {engine.identity.model_id}'
                   f" (sha256 {engine.identity.sha256[:12]}...). Load the matching model or retrain the head.")
        raise RuntimeError(message)
    config = metadata["head"]
    head = LocalizationHead(config["embed_dim"], config["projection_dim"], config["temperature"], metadata)
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return head.eval()
