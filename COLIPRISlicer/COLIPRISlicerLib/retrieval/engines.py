"""Which engine builds an index: ``local`` (this process, :func:`.index.build_index`) or ``ray``
(a Ray Data pipeline, :func:`.ray_engine.build_index_ray`); both write the same rows and folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.retrieval.index import IndexRun, build_index
from COLIPRISlicerLib.retrieval.ray_engine import build_index_ray, require_ray
from COLIPRISlicerLib.retrieval.sources import SeriesEntry

ENGINES = ("local", "ray")


def check_engine(engine: str, ray_address: str | None = None) -> None:
    """Refuse an unknown engine, an address without Ray, or Ray not installed, before any work.

    Raises:
        ValueError: For an unknown engine or an address given to the local one.
        RuntimeError: For ``ray`` without Ray Data installed (saying what to install).
    """
    if engine not in ENGINES:
        raise ValueError(f'Unknown --engine "{engine}"; choose local or ray.')
    if ray_address and engine != "ray":
        raise ValueError(f'--ray-address "{ray_address}" needs --engine ray.')
    if engine == "ray":
        require_ray()


def index_series(entries: Sequence[SeriesEntry], model: str, out: Path, *, engine: str = "local", device: str = "auto",
                 ray_address: str | None = None, batch: int | None = None, progress: bool = True) -> IndexRun:
    """Index ``entries`` into ``out`` with ``model`` on the chosen engine (see :func:`check_engine`).

    Args:
        batch: series per encoder pass (None: 1 locally; on Ray, from the GPU's memory).
        device: the encoder's device; on Ray each worker resolves it, the driver stays on the CPU.
    """
    if engine == "ray":
        analyzer = Analyzer(Engine(model, device="cpu", status_callback=None))  # the workers choose their device
        return build_index_ray(entries, analyzer, out, address=ray_address, batch=batch, device=device,
                               progress=progress)
    analyzer = Analyzer(Engine(model, device=device, status_callback=None))
    return build_index(entries, analyzer, out, progress=progress, batch=batch or 1)
