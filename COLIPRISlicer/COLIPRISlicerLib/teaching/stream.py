"""Phantoms generated in worker processes and handed over in seed order.

Calibration, evaluation and head training analyse one phantom at a time on the engine's
device while the next ones are generated on the other CPU cores (16 on a GPU workstation).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from ..volume import Volume


def phantom_stream(seeds: list[int], *, workers: int = 1, coarse: bool = False) -> Iterator[tuple[Volume, dict]]:
    """Yield :func:`.phantom.generate_phantom`'s ``(volume, truth)`` for ``seeds``, in order.

    Args:
        seeds: phantom seeds.
        workers: generating processes (1: in this process, one at a time).
        coarse: the training set's coarse geometry (:func:`.dataset.coarse_geometry`)
            instead of the generator's own random one.
    """
    job = partial(_generate, coarse=coarse)
    if workers <= 1 or len(seeds) < 2:
        yield from map(job, seeds)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=one_thread) as pool:
        yield from pool.imap(job, seeds)


def _generate(seed: int, coarse: bool) -> tuple[Volume, dict]:
    from .phantom import generate_phantom
    from .dataset import coarse_geometry

    return generate_phantom(seed, **(coarse_geometry(seed) if coarse else {}))


def one_thread() -> None:
    """Pool initialiser: one torch thread per worker process (the workers share the cores)."""
    import torch

    torch.set_num_threads(1)
