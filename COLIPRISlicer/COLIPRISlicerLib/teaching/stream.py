"""Phantoms generated in worker processes and handed over in seed order.

Calibration, evaluation and head training analyse one phantom at a time on the engine's
device while the next ones are generated on the other CPU cores (16 on a GPU workstation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np

from COLIPRISlicerLib.io.volume import Volume


def phantom_stream(seeds: list[int], *, workers: int = 1, coarse: bool = False) -> Iterator[tuple[Volume, dict]]:
    """Yield :func:`.phantom.generate_phantom`'s ``(volume, truth)`` for ``seeds``, in order.

    Args:
        seeds: phantom seeds.
        workers: generating processes (1: in this process, one at a time).
        coarse: the training set's coarse geometry (:func:`coarse_geometry`)
            instead of the generator's own random one.
    """
    yield from in_workers(partial(generate, coarse=coarse), seeds, workers)


def in_workers(job: Callable, items: list, workers: int, *, chunksize: int = 1, fewest: int = 2) -> Iterator:
    """``job(item)`` for each item, in order: in ``workers`` spawned processes of one torch thread each,
    or in this process when ``workers`` <= 1 or there are fewer than ``fewest`` items."""
    if workers <= 1 or len(items) < fewest:
        yield from map(job, items)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=one_thread) as pool:
        yield from pool.imap(job, items, chunksize=chunksize)


def coarse_geometry(seed: int) -> dict[str, float]:
    """Voxel sizes of a coarse training phantom (2.5-3 mm in-plane, 2-5 mm slices), drawn from its seed."""
    rng = np.random.default_rng([seed, 7])
    return {"in_plane_mm": float(rng.uniform(2.5, 3.0)), "slice_mm": float(rng.choice([2.0, 2.5, 3.0, 5.0]))}


def generate(seed: int, coarse: bool = False) -> tuple[Volume, dict]:
    """Phantom ``seed`` at the training set's coarse geometry, or at the generator's own random one."""
    from COLIPRISlicerLib.teaching.phantom import generate_phantom

    return generate_phantom(seed, **(coarse_geometry(seed) if coarse else {}))


def one_thread() -> None:
    """Pool initialiser: one torch thread per worker process (the workers share the cores)."""
    import torch

    torch.set_num_threads(1)
