"""A head's training checkpoint (``checkpoint.pt``): written whole after every epoch, read back to resume.

A checkpoint holds the network and optimiser state, the epochs done, their history and seconds,
and the run's ``setup`` (encoder, architecture, labels, split, recipe); it resumes only a run
with the same setup. Checkpoints from before crops, rare-class options and refined heads existed
read as those defaults. Torch is imported inside functions: the engine loads it on first use.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from COLIPRISlicerLib.io.atomic import atomic_path
from COLIPRISlicerLib.segmentation.recipe import RareClasses

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def resume_checkpoint(path: Path, setup: dict, network, optimizer) -> dict:
    """Load a checkpoint into network and optimizer; return its epoch, history and seconds.

    Raises:
        RuntimeError: For a corrupt checkpoint.
        ValueError: For a checkpoint of another training run (its setup differs).
    """
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for corrupt files
        raise RuntimeError(f'Checkpoint "{path}" is corrupt ({error}). Delete it to start again.') from error
    stored = {"crop_patches": None, **asdict(RareClasses()), **checkpoint["setup"]}  # from before these existed
    stored["architecture"] = {"refine": 1, **stored["architecture"]}  # and from before refined heads
    if stored != setup:
        changed = sorted(key for key in setup.keys() | stored.keys() if stored.get(key) != setup.get(key))
        message = (
            f'Checkpoint "{path}" belongs to another training run ({", ".join(changed)} differ). Choose another'
            " output folder, or delete the checkpoint to start again."
        )
        raise ValueError(message)
    network.load_state_dict(checkpoint["network"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    logger.info("Resuming from epoch %d (%s).", checkpoint["epoch"], path)
    return checkpoint


def save_checkpoint(path: Path, network, optimizer, setup: dict, epoch: int, history: list, seconds: float) -> None:
    """Write the checkpoint whole (:func:`..io.atomic.atomic_path`)."""
    import torch

    state = {"epoch": epoch, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
             "setup": setup, "history": history, "seconds": seconds}
    with atomic_path(path) as partial:
        torch.save(state, partial)
