"""Benchmark the segmentation head: train on generated sphere volumes, report Dice and time.

Trains a head on the tiny random COLIPRI of the tests (64^3 at 6 mm, 8^3 patches, 48-d
features) or on ``--model``, for ten generated volumes (air with soft-tissue spheres), then
segments unseen generated volumes and prints their Dice with the training time.

Usage: .venv/bin/python bench/bench_segmentation_head.py [--epochs 2] [--base-channels 8]
       [--learning-rate 1e-2] [--cases 10] [--unseen 3] [--model FOLDER] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))
VOCAB = REPO.parent / "shared" / "data" / "cxrbert" / "vocab.txt"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--cases", type=int, default=10, help="generated training volumes")
    parser.add_argument("--unseen", type=int, default=3, help="generated test volumes")
    parser.add_argument("--model", help="model folder or spec (default: the tests' tiny random model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def tiny_model(folder: Path) -> str:
    from COLIPRISlicerLib.model.folder import SmallModelSpec, write_small_model

    return str(write_small_model(folder, VOCAB, SmallModelSpec(seed=1234), extra={"model_id": "tests/tiny-random"}))


def unseen_dice(engine, head_dir: Path, folder: Path, count: int) -> list[float]:
    from COLIPRISlicerLib.segmentation.data import read_label
    from COLIPRISlicerLib.segmentation.head import predict
    from COLIPRISlicerLib.segmentation.head import load_head
    from COLIPRISlicerLib.segmentation.data import make_sphere_dataset
    from COLIPRISlicerLib.io.volume import load_volume

    head = load_head(head_dir, engine)
    images, labels = make_sphere_dataset(folder, count, seed=12345)
    scores = []
    for image_path in sorted(images.iterdir()):
        volume = load_volume(image_path)
        truth = read_label(labels / image_path.name)[0] == 1
        predicted = predict(head, engine.encode(volume), volume).labelmap == 1
        scores.append(float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())))
    return scores


def main() -> None:
    import torch

    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.segmentation.data import make_sphere_dataset
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    arguments = parse_arguments()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        engine = Engine(arguments.model or tiny_model(root / "model"), device=arguments.device, precision="fp32")
        images, labels = make_sphere_dataset(root / "train", arguments.cases, seed=0)
        start = time.perf_counter()
        summary = train_segmentation_head(images, labels, engine, root / "head", epochs=arguments.epochs,
                                          base_channels=arguments.base_channels,
                                          learning_rate=arguments.learning_rate, label_names={1: "Sphere"})
        seconds = time.perf_counter() - start
        scores = unseen_dice(engine, root / "head", root / "unseen", arguments.unseen)
    result = {
        "epochs": summary.epochs_completed, "train_cases": len(summary.train_cases),
        "validation_dice": summary.validation_dice, "unseen_dice": [round(s, 4) for s in scores],
        "unseen_dice_mean": round(float(np.mean(scores)), 4), "training_seconds": round(seconds, 1),
        "seconds_per_epoch": [entry["seconds"] for entry in summary.history],
        "base_channels": arguments.base_channels, "learning_rate": arguments.learning_rate,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": engine.identity.device},
    }
    print(json.dumps(result, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
