"""Trainable snippet-localisation head on frozen COLIPRI patch embeddings (RadFinder's loss).

Depth features: the dense patch embeddings (embed_dim, gx, gy, gz) averaged over the two
in-plane axes, one vector per level along the grid axis closest to S. A learned linear
projection of the depth features and of the snippet embedding; logits = cosine similarity /
0.1; loss = cross-entropy against a one-hot target at the snippet's level blurred by a
Gaussian of sigma = 24 mm / level size (mm). Files: ``localizer.safetensors`` (weights) and
``localizer.json`` (encoder identity, grid, training summary).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .encoding import ImageEncoding
from .localization import axis_closest_to_s, level_s_mm
from .types import TypePath

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
        levels = level_s_mm(encoding.grid)
        size = float(encoding.grid.patch_mm[axis_closest_to_s(encoding.grid.grid_to_ras)])
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
    axis = axis_closest_to_s(encoding.grid.grid_to_ras)
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


def load_head(folder: TypePath, engine=None) -> LocalizationHead:
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


@dataclass(frozen=True)
class LocalizationRow:
    """One CSV row: a scan (file or DICOM folder), a snippet and its true S or DICOM InstanceNumber."""

    scan: Path
    snippet: str
    s_mm: float | None = None
    instance_number: int | None = None


def read_localization_csv(path: TypePath) -> list[LocalizationRow]:
    """Rows of a CSV with columns ``scan,snippet,s_mm`` or ``scan,snippet,instance_number``.

    Relative scan paths are taken relative to the CSV's folder.

    Raises:
        ValueError: missing columns, or a row with neither ``s_mm`` nor ``instance_number``.
    """
    import csv

    path = Path(path)
    with path.open(newline="", encoding="utf-8") as file:
        records = list(csv.DictReader(file))
    columns = set(records[0]) if records else set()
    if not {"scan", "snippet"} <= columns or not columns & {"s_mm", "instance_number"}:
        raise ValueError(f'"{path}" needs the columns scan,snippet,s_mm or scan,snippet,instance_number; got {sorted(columns)}.')
    rows = []
    for line, record in enumerate(records, start=2):
        s_mm, number = (record.get("s_mm") or "").strip(), (record.get("instance_number") or "").strip()
        if not (s_mm or number):
            raise ValueError(f'"{path}" line {line}: give s_mm or instance_number.')
        scan = Path(record["scan"]) if Path(record["scan"]).is_absolute() else path.parent / record["scan"]
        rows.append(LocalizationRow(scan, record["snippet"], float(s_mm) if s_mm else None,
                                    None if s_mm else int(number)))
    return rows


def row_s_mm(row: LocalizationRow, volume) -> float:
    """True S (mm) of a row: ``s_mm``, or the S of the slice whose DICOM InstanceNumber is given.

    Raises:
        ValueError: the volume has no DICOM instance numbers or none equals the row's.
    """
    from .localization import plane_centre_ras

    if row.s_mm is not None:
        return row.s_mm
    numbers = volume.slices.instance_numbers if volume.slices is not None else ()
    if row.instance_number not in numbers:
        raise ValueError(f'InstanceNumber {row.instance_number} is not a slice of "{row.scan}" (need a DICOM series).')
    return float(plane_centre_ras(volume, 2, numbers.index(row.instance_number))[2])


def s_range_mm(volume) -> tuple[float, float]:
    """Lowest and highest S (mm) of the volume's voxel centres."""
    from . import geometry

    corners = np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape], indexing="ij")).reshape(3, -1).T
    s = geometry.ijk_to_ras(volume.ijk_to_ras, corners.astype(float))[:, 2]
    return float(s.min()), float(s.max())


def _scans(rows: Sequence[LocalizationRow], engine):
    """Yield (volume, cached encoding, rows) per scan, loading one volume at a time."""
    from .volume import load_volume

    groups: dict[Path, list[LocalizationRow]] = {}
    for row in rows:
        groups.setdefault(row.scan, []).append(row)
    for scan, group in groups.items():
        volume = load_volume(scan)
        yield volume, engine.encode(volume), group


def build_samples(rows: Sequence[LocalizationRow], engine) -> tuple[list[LocalizationSample], dict]:
    """Samples (explicit references removed from the snippets) and the grid of the encodings."""
    from .localization import strip_references

    samples, grid = [], {}
    for volume, encoding, group in _scans(rows, engine):
        snippets = [strip_references(row.snippet) or row.snippet for row in group]
        for row, snippet, text in zip(group, snippets, engine.embed_prompts(snippets)):
            samples.append(LocalizationSample.from_encoding(str(row.scan), snippet, row_s_mm(row, volume), encoding,
                                                            text, s_range_mm(volume)))
        grid = {**encoding.grid.as_dict(), "shape": list(encoding.grid.shape),
                "patch_mm": encoding.grid.patch_mm.tolist(), "depth_axis": axis_closest_to_s(encoding.grid.grid_to_ras)}
    return samples, grid


def train_localizer(rows: Sequence[LocalizationRow], engine, out_dir: TypePath, *, epochs: int = 200,
                    seed: int = 0) -> tuple[LocalizationHead, dict]:
    """Encode each scan once (engine cache), train a head and save it to ``out_dir``."""
    samples, grid = build_samples(rows, engine)
    head, summary = fit_head(samples, epochs=epochs, seed=seed)
    summary["train_metrics"] = evaluate_predictions(samples, [predict_s_mm(head, s) for s in samples], seed=seed)
    identity = engine.identity
    encoder = {"model_id": identity.model_id, "revision": identity.revision, "sha256": identity.sha256}
    save_head(head, out_dir, encoder=encoder, grid=grid, training=summary)
    return head, summary


def localization_metrics(predicted_s_mm, true_s_mm, scans: Sequence[str], *, predicted_levels=None,
                         true_levels=None) -> dict:
    """MAE, median error, accuracy within 12/24 mm, exact-level accuracy and per-scan MAE (mm)."""
    errors = np.abs(np.asarray(predicted_s_mm, float) - np.asarray(true_s_mm, float))
    exact = None if predicted_levels is None else float(np.mean(np.equal(predicted_levels, true_levels)))
    per_scan = {scan: float(errors[[s == scan for s in scans]].mean()) for scan in dict.fromkeys(scans)}
    return {"count": int(errors.size), "mae_mm": float(errors.mean()), "median_error_mm": float(np.median(errors)),
            "exact_bin_accuracy": exact, "within_12mm": float(np.mean(errors <= 12 + 1e-6)),
            "within_24mm": float(np.mean(errors <= 24 + 1e-6)), "per_scan_mae_mm": per_scan}


def evaluate_predictions(samples: Sequence[LocalizationSample], predicted_s_mm: Sequence[float], *, seed: int = 0) -> dict:
    """Metrics of predictions and of the middle-slice and (seeded) random-slice baselines."""
    rng = np.random.default_rng(seed)
    baselines = {"middle_slice": [sum(s.s_range_mm) / 2 for s in samples],
                 "random_slice": [rng.uniform(*s.s_range_mm) for s in samples]}
    result = {}
    for name, predicted in {"method": list(predicted_s_mm), **baselines}.items():
        levels = [int(np.argmin(np.abs(s.level_s_mm - p))) for s, p in zip(samples, predicted)]
        result[name] = localization_metrics(predicted, [s.s_mm for s in samples], [s.scan for s in samples],
                                            predicted_levels=levels, true_levels=[s.target_level for s in samples])
    return result


def evaluate_localizer(rows: Sequence[LocalizationRow], engine, head: LocalizationHead | None = None,
                       method: str | None = None, *, seed: int = 0) -> dict:
    """Localise every row with ``localization.localize`` and score it against the baselines.

    Explicit references are removed from the snippets unless ``method`` is ``reference``.
    ``method`` defaults to ``head`` when a head is given, else ``auto``.
    """
    from .landmarks import detect_landmarks
    from .localization import localize, strip_references

    method = method or ("head" if head is not None else "auto")
    samples, predicted = [], []
    for volume, encoding, group in _scans(rows, engine):
        needs_landmarks = method in ("auto", "combined", "anatomy")
        landmarks = detect_landmarks(volume.array, volume.ijk_to_ras) if needs_landmarks else None
        for row in group:
            text = row.snippet if method == "reference" else strip_references(row.snippet) or row.snippet
            result = localize(engine, encoding, volume, text, method=method, head=head, landmarks=landmarks)
            predicted.append(result.s_mm)
            samples.append(LocalizationSample.from_encoding(str(row.scan), text, row_s_mm(row, volume), encoding,
                                                            engine.embed_prompts([text])[0], s_range_mm(volume)))
    return {"method_name": method, **evaluate_predictions(samples, predicted, seed=seed)}


def format_metrics(report: dict) -> str:
    """A small text table of :func:`evaluate_localizer`'s result."""
    lines = [f"{'':14}{'MAE':>9}{'median':>9}{'exact':>8}{'<=12mm':>8}{'<=24mm':>8}"]
    for name in ("method", "middle_slice", "random_slice"):
        m = report[name]
        exact = "-" if m["exact_bin_accuracy"] is None else f"{m['exact_bin_accuracy']:.0%}"
        label = report.get("method_name", "method") if name == "method" else name.replace("_", " ")
        lines.append(f"{label:<14}{m['mae_mm']:>7.1f}mm{m['median_error_mm']:>7.1f}mm{exact:>8}"
                     f"{m['within_12mm']:>8.0%}{m['within_24mm']:>8.0%}")
    lines += [f"  {scan}: MAE {mae:.1f} mm" for scan, mae in report["method"]["per_scan_mae_mm"].items()]
    return "\n".join(lines)


def train_localizer_command(csv: TypePath, model: str, out: TypePath, epochs: int = 200, device: str = "auto", *,
                            seed: int = 0, cache_dir: TypePath | None = None, echo=None) -> dict:
    """``colipri-slicer train-localizer``: train on a CSV, write ``out/localizer.*``; returns the summary."""
    _, summary = train_localizer(read_localization_csv(csv), _engine(model, device, cache_dir), out,
                                 epochs=epochs, seed=seed)
    (echo or logger.info)(f"Wrote {Path(out) / HEAD_WEIGHTS} ({summary['num_samples']} pairs); training fit:\n"
                          + format_metrics({"method_name": "head", **summary["train_metrics"]}))
    return summary


def eval_localizer_command(csv: TypePath, model: str, head: TypePath | None = None, method: str | None = None,
                           device: str = "auto", *, seed: int = 0, cache_dir: TypePath | None = None, echo=None) -> dict:
    """``colipri-slicer eval-localizer``: metrics of a method (or a head) on a CSV, with baselines."""
    engine = _engine(model, device, cache_dir)
    report = evaluate_localizer(read_localization_csv(csv), engine, load_head(head, engine) if head else None,
                                method, seed=seed)
    (echo or logger.info)(format_metrics(report))
    return report


def _engine(model: str, device: str, cache_dir: TypePath | None):
    from .defaults import user_cache_dir
    from .engine import Engine

    return Engine(model, device=device, cache_dir=cache_dir or user_cache_dir() / "embeddings")
