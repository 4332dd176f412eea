"""Index on Ray: a Ray Data pipeline over the series, same rows and folder as the local engine.

Reading and preprocessing run as Ray tasks on CPUs (``Dataset.map``); encoding runs in a pool of
actors that each load the model once (``Dataset.map_batches`` with :class:`SeriesIndexer`), one
GPU each on CUDA. Each actor writes the rows of each batch as its own Parquet shard into the index
folder, so on a cluster ``--out`` must be a folder every node sees (a shared file system). Series
already indexed with the same model and preprocessing are left out before the dataset is built.
"""

from __future__ import annotations

import logging
import pickle
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.retrieval.index import (
    IndexRun,
    engine_manifest,
    open_index,
    pending_entries,
    record_embed_dim,
    record_rows,
    shard_count,
    write_shard,
)
from COLIPRISlicerLib.retrieval.sources import SeriesEntry

if TYPE_CHECKING:
    from COLIPRISlicerLib.analysis import Analyzer

logger = logging.getLogger(__name__)

#: What to install for ``--engine ray``.
RAY_INSTALL = "pip install 'colipri-slicer[cluster]' (or: pip install 'ray[data]>=2.40,<3')"
#: Memory a read-and-preprocess task asks Ray for (a 512 x 512 x 600 int16 series and its model input).
PREPARE_MEMORY = 1 << 30
#: Series per batch on the CPU, where a larger batch saves nothing.
CPU_BATCH = 2
#: GPU memory (GiB) the model holds, and what each series of a batch adds (COLIPRI at 192^3:
#: bench/results_cuda_h200_issue24.json measured 1.9 GB peak for one series with the weights).
MODEL_GIB, GIB_PER_SERIES, MAX_GPU_BATCH = 2.0, 2.0, 16


def require_ray():
    """The ``ray`` module.

    Raises:
        RuntimeError: if Ray (with Ray Data) is not installed, saying what to install.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        message = f"--engine ray needs Ray Data, which is not installed ({error}); install it with {RAY_INSTALL}."
        raise RuntimeError(message) from None
    return ray


def connect(address: str | None = None) -> None:
    """Attach to the Ray cluster at ``address``, or start a local one (``ray.init()``); nothing when
    this process is already connected."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False) if address else ray.init(include_dashboard=False)
    logger.info("Ray: %s", {name: ray.cluster_resources().get(name, 0) for name in ("CPU", "GPU")})


def encoder_placement(device: str, resources: dict) -> tuple[int, float, float, str]:
    """``(actors, GPUs per actor, CPUs per actor, actor device)`` of the encoder pool.

    On CUDA: one actor per GPU of the cluster. On the CPU: half the CPUs encode (up to 4 per
    actor), the other half read and preprocess.

    Raises:
        ValueError: for a device Ray cannot place (``mps``).
        RuntimeError: for ``cuda`` on a cluster without GPUs.
    """
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device.startswith("cuda") or (device == "auto" and gpus):
        if not gpus:
            raise RuntimeError(f'--device {device}, but the Ray cluster has no GPU ({resources.get("CPU", 0)} CPUs);'
                               " give --device cpu, or a --ray-address of a cluster with GPUs.")
        return gpus, 1.0, 1.0, "cuda"
    if device not in ("auto", "cpu"):
        raise ValueError(f'--engine ray encodes on CUDA or the CPU, not "{device}"; give --device auto, cuda or cpu.')
    per_actor = min(4, max(1, cpus // 2))
    return max(1, cpus // (2 * per_actor)), 0.0, float(per_actor), "cpu"


def default_batch(actor_device: str) -> int:
    """Series per encoder batch: ``CPU_BATCH`` on the CPU; on CUDA, what one GPU's memory holds
    (asked of a GPU worker, since the driver may have none)."""
    if actor_device != "cuda":
        return CPU_BATCH
    ray = require_ray()
    return batch_for_gpu_memory(ray.get(ray.remote(num_gpus=1)(_gpu_memory_bytes).remote()))


def batch_for_gpu_memory(total_bytes: int) -> int:
    """Series per batch that fit beside the model in a GPU of ``total_bytes`` (1 to ``MAX_GPU_BATCH``)."""
    return max(1, min(MAX_GPU_BATCH, int((total_bytes / 2**30 - MODEL_GIB) // GIB_PER_SERIES)))


def _gpu_memory_bytes() -> int:
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def build_index_ray(entries: Sequence[SeriesEntry], analyzer: Analyzer, out: Path, *, address: str | None = None,
                    batch: int | None = None, device: str | None = None, progress: bool = True) -> IndexRun:
    """Index every entry not yet indexed in ``out``, on Ray (see the module docstring).

    Args:
        entries: the series (``sources.expand_sources``).
        analyzer: an ``Analyzer`` whose engine names the model, device, precision and preprocessing
            (each actor builds its own from them).
        out: the index folder (created, or resumed).
        address: a Ray cluster's address; None starts or attaches a local Ray.
        batch: series per encoder batch (``map_batches`` batch size); None: :func:`default_batch`.
        device: the encoders' device (``auto``, ``cuda`` or ``cpu``; None: the analyzer's engine's),
            chosen on the cluster's workers, so the driver needs no GPU.
        progress: show a progress bar with ETA.

    Raises:
        RuntimeError: if Ray is not installed.
        ValueError: if ``out`` is a folder with other content, or an index of another model.
    """
    ray = require_ray()
    out = Path(out)
    wanted = engine_manifest(analyzer)
    run = IndexRun()
    todo = pending_entries(entries, open_index(out, wanted), run)
    if not todo:
        return run
    connect(address)
    dataset = _pipeline(ray, todo, analyzer, out, wanted, batch, device or analyzer.engine.device)
    dims = []
    from tqdm import tqdm

    for row in tqdm(dataset.iter_rows(), total=len(todo), desc="series", unit="series", disable=not progress):
        record_rows(run, [{"key": str(row["key"]), "error": str(row["error"]) or None}])
        dims.append(int(row["embed_dim"]))
    record_embed_dim(out, wanted, max(dims, default=0) or None)
    return run


def _pipeline(ray, todo: list[SeriesEntry], analyzer, out: Path, manifest: dict, batch: int | None, device: str):
    """The dataset: series -> read and preprocess (tasks) -> encode and write shards (actors)."""
    engine = analyzer.engine
    actors, gpus, cpus, actor_device = encoder_placement(device, ray.cluster_resources())
    batch = batch or default_batch(actor_device)
    logger.info("Ray: %d series, %d encoder actor(s) on %s, %d series per batch.", len(todo), actors, actor_device,
                batch)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"key": entry.key, "entry": pickle.dumps(entry)} for entry in todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # The task's memory request differs from the actors' resources, so Ray keeps the two stages apart.
    dataset = dataset.map(prepare_row, memory=PREPARE_MEMORY, fn_kwargs={
        "processor_config": engine.description.resolved.config["processor"], "method": engine.preprocessing})
    settings = {"model": engine.spec, "device": actor_device, "precision": engine.precision,
                "preprocessing": engine.preprocessing, "catalogue": analyzer.catalogue, "manifest": manifest,
                "shard_prefix": str(out / f"part-{shard_count(out):05d}-"), "threads": int(cpus)}
    return dataset.map_batches(SeriesIndexer, fn_constructor_kwargs=settings, batch_size=batch, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=cpus)


def prepare_row(row: dict, *, processor_config: dict, method: str) -> dict:
    """Ray task: read and preprocess one series on the CPU -> ``{"key", "prepared"}`` (pickled
    ``PreparedSeries``: the volume and model input, or the error)."""
    from COLIPRISlicerLib.model.loading import build_image_transform
    from COLIPRISlicerLib.retrieval.stages import prepare_series

    entry = pickle.loads(row["entry"])
    prepared = prepare_series(entry, build_image_transform(processor_config), method=method, device="cpu")
    return {"key": row["key"], "prepared": pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL)}


class SeriesIndexer:
    """Ray actor: loads the model once, then encodes batches of prepared series and writes each
    batch's rows as one Parquet shard ``<shard_prefix><random>.parquet``.

    Args:
        model, device, precision, preprocessing: the ``Engine``'s settings.
        catalogue: the findings whose likelihoods are stored.
        manifest: the index's ``index.json`` content.
        shard_prefix: path prefix of the shards this run writes.
        threads: torch threads (the CPUs Ray gave this actor).
    """

    def __init__(self, *, model: str, device: str, precision: str, preprocessing: str, catalogue, manifest: dict,
                 shard_prefix: str, threads: int):
        import torch

        from COLIPRISlicerLib.analysis import Analyzer
        from COLIPRISlicerLib.encoding.engine import Engine
        from COLIPRISlicerLib.retrieval.index import check_same_model

        torch.set_num_threads(max(1, threads))
        self.analyzer = Analyzer(Engine(model, device=device, precision=precision, preprocessing=preprocessing),
                                 catalogue)
        check_same_model(manifest, engine_manifest(self.analyzer), Path(shard_prefix).parent)
        self.manifest, self.shard_prefix = manifest, shard_prefix

    def __call__(self, batch: dict) -> dict:
        from COLIPRISlicerLib.retrieval.stages import index_rows

        prepared = [pickle.loads(payload) for payload in batch["prepared"]]
        rows = index_rows(self.analyzer, prepared, self.manifest)
        dim = write_shard(rows, Path(f"{self.shard_prefix}{uuid.uuid4().hex[:12]}.parquet"), self.manifest)
        return {"key": np.array([row["key"] for row in rows]),
                "error": np.array([row["error"] or "" for row in rows]),
                "embed_dim": np.full(len(rows), dim or 0)}
