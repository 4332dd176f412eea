"""Similar cases: ``index`` series into Parquet and ``search`` them by text, scan or indexed series."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.cli.analyze import load_scan
from COLIPRISlicerLib.cli.errors import UserError
from COLIPRISlicerLib.cli.options import DeviceOption, ModelOption, status
from COLIPRISlicerLib.defaults import DEFAULT_MODEL
from COLIPRISlicerLib.retrieval.backends import choose_backend
from COLIPRISlicerLib.retrieval.engines import check_engine, index_series
from COLIPRISlicerLib.retrieval.query import query_vector
from COLIPRISlicerLib.retrieval.regions import REGIONS
from COLIPRISlicerLib.retrieval.search import Hit, SearchIndex, where_mask
from COLIPRISlicerLib.retrieval.sources import expand_sources


def index(
    sources: Annotated[list[Path], typer.Argument(help="Image files, folders (DICOM series found recursively) or ctkDICOM.sql.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder (created, or resumed when it holds an index).")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray Data pipeline; pip install 'colipri-slicer[cluster]').")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to run on (default: start or attach a local Ray); --out must be on storage every node sees.")] = None,
    batch: Annotated[Optional[int], typer.Option(min=1, help="Series per encoder batch (default: 1 locally; with ray, from the GPU's memory, 2 on CPUs).")] = None,
    show_progress: Annotated[bool, typer.Option("--show-progress/--hide-progress")] = True,
) -> None:
    """Index series for similar-case search: embeddings (whole, lungs, heart), 18 likelihoods -> Parquet."""
    check_engine(engine, ray_address)
    entries = expand_sources(sources)
    if not entries:
        raise UserError(f"No image file or DICOM series found in {', '.join(map(str, sources))}.")
    run = index_series(entries, model, out, engine=engine, device=device, ray_address=ray_address, batch=batch,
                       progress=show_progress)
    for key, error in run.failed.items():
        typer.echo(f"Failed: {key}: {error}", err=True)
    status(f"{out}: {len(run.indexed)} indexed, {len(run.skipped)} already there, {len(run.failed)} failed"
           + (" (recorded; run again to retry)" if run.failed else ""))


def search(
    index_dir: Annotated[Path, typer.Argument(help="Index folder written by `colipri-slicer index`.")],
    text: Annotated[Optional[str], typer.Option("--text", help="Find series matching this text.")] = None,
    scan: Annotated[Optional[Path], typer.Option("--scan", exists=True, help="Find series like this scan.")] = None,
    like: Annotated[Optional[str], typer.Option("--like", help="Find series like this indexed SeriesInstanceUID (or path).")] = None,
    region: Annotated[Optional[str], typer.Option(help="Compare region embeddings: lungs, heart (mediastinum below the"
                                                       " carina) or mediastinum (all between the lungs).")] = None,
    where: Annotated[Optional[str], typer.Option(help='Likelihood filter, e.g. "Pleural effusion>0.7".')] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Number of hits.")] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="Print the hits as a JSON list.")] = False,
    device: DeviceOption = "auto",
    backend: Annotated[str, typer.Option(help="exact (numpy), faiss (pip install 'colipri-slicer[faiss]') or auto"
                                              " (faiss above a million vectors when installed).")] = "auto",
) -> None:
    """Similar cases: cosine top-k over an index by text, by a scan or by an indexed series."""
    if sum(value is not None for value in (text, scan, like)) != 1:
        raise UserError("Give exactly one of --text, --scan or --like.")
    if region not in (None, *REGIONS):
        raise UserError(f'Unknown --region "{region}"; choose {", ".join(REGIONS)} (or leave it out for the whole scan).')
    choose_backend(backend, 0)  # an unknown backend or a missing faiss is refused before the model loads
    searched = SearchIndex(index_dir)
    where_mask(where, searched.findings, searched.likelihoods)  # a malformed filter is refused before the model loads
    query = query_vector(searched, text=text, scan=scan, like=like, region=region, device=device,
                         load_scan=lambda path: load_scan(path, False))
    hits = searched.search(query, region=region, where=where, k=k, backend=backend)
    if not hits:
        reason = f'matches --where "{where}"; loosen the filter' if where else f"has a {region} embedding; search without --region"
        raise UserError(f"No indexed series {reason}.")
    _print_hits(hits, json_output)


def _print_hits(hits: list[Hit], json_output: bool) -> None:
    """The hits on stdout: a JSON list, or one line each with the three most likely findings."""
    if json_output:
        typer.echo(json.dumps([hit.as_dict() for hit in hits], indent=2))
        return
    for hit in hits:
        top = sorted(hit.likelihoods.items(), key=lambda item: -item[1])[:3]
        typer.echo(f"{hit.score:7.4f}  {hit.series_uid or '-'}  {hit.source}  "
                   + ", ".join(f"{name} {value:.2f}" for name, value in top))
