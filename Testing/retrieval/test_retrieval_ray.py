"""``index --engine ray``: the Ray Data pipeline writes the index the local engine writes.

One local Ray of 2 CPUs serves the module; the tiny random model keeps each encoder pass short.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is the 'cluster' extra: pip install -e '.[cluster]' (setup_env installs it)")

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.retrieval import ray_engine
from COLIPRISlicerLib.retrieval.index import FORMAT, MANIFEST, VECTOR_COLUMNS, build_index, read_index
from COLIPRISlicerLib.retrieval.ray_engine import batch_for_gpu_memory, build_index_ray, encoder_placement
from COLIPRISlicerLib.retrieval.search import SearchIndex
from COLIPRISlicerLib.retrieval.sources import expand_sources

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "COLIPRISlicer"
PHANTOM_SEEDS = (20_000_000, 20_000_001, 20_000_002)
UNREADABLE = "broken.nii.gz"


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs whose workers import this checkout's engine."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PACKAGE_ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Three small phantoms (3 mm in plane, 5 mm slices) and one file that is not an image."""
    from COLIPRISlicerLib.teaching.phantom import write_phantom

    folder = tmp_path_factory.mktemp("sources")
    scratch = tmp_path_factory.mktemp("phantoms")
    for seed in PHANTOM_SEEDS:
        write_phantom(seed, scratch / str(seed), in_plane_mm=3.0, slice_mm=5.0)
        shutil.copy(scratch / str(seed) / "phantom.nii.gz", folder / f"phantom_{seed}.nii.gz")
    (folder / UNREADABLE).write_bytes(b"not a NIfTI file")
    return folder


@pytest.fixture(scope="module")
def analyzer(tiny_model_folder) -> Analyzer:
    return Analyzer(Engine(str(tiny_model_folder), device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def indexes(ray_session, sources, analyzer, tmp_path_factory) -> dict:
    """The same sources indexed by both engines (local: one series per pass; Ray: two)."""
    root = tmp_path_factory.mktemp("indexes")
    entries = expand_sources([sources])
    local = build_index(entries, analyzer, root / "local", progress=False, batch=1)
    ray = build_index_ray(entries, analyzer, root / "ray", batch=2, progress=False)
    return {"local": (root / "local", local), "ray": (root / "ray", ray)}


def _rows(folder: Path) -> dict[str, dict]:
    return {row["key"]: row for row in read_index(folder).to_pylist()}


def test_ray_and_local_engines_write_the_same_rows(indexes, sources):
    local, ray = _rows(indexes["local"][0]), _rows(indexes["ray"][0])
    assert sorted(local) == sorted(ray) == sorted(str(path) for path in sources.iterdir())
    assert read_index(indexes["local"][0]).schema == read_index(indexes["ray"][0]).schema
    for key, expected in local.items():
        got = ray[key]
        for name in VECTOR_COLUMNS:
            assert (expected[name] is None) == (got[name] is None), (key, name)
            if expected[name] is not None:
                np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6)
        for name in [column for column in expected if column[0].isupper()]:  # the 18 likelihoods
            assert got[name] == pytest.approx(expected[name], abs=1e-6), (key, name)
        assert (got["error"], got["model_sha256"], got["preprocessing"]) == (
            expected["error"], expected["model_sha256"], expected["preprocessing"])
    assert sum(row["pooled"] is not None for row in local.values()) == len(PHANTOM_SEEDS)


def test_ray_and_local_indexes_rank_the_same(indexes):
    local, ray = SearchIndex(indexes["local"][0]), SearchIndex(indexes["ray"][0])
    for key in local.keys:
        for region in (None, "lungs"):
            query = local.vector_of(key, region)
            if np.isnan(query).any():
                continue
            local_hits = local.search(query, region=region, k=3)
            ray_hits = ray.search(query, region=region, k=3)
            assert [hit.source for hit in ray_hits] == [hit.source for hit in local_hits]
            np.testing.assert_allclose([h.score for h in ray_hits], [h.score for h in local_hits], rtol=0, atol=1e-5)


def test_ray_records_the_unreadable_series_and_goes_on(indexes, sources):
    run = indexes["ray"][1]
    broken = str(sources / UNREADABLE)
    assert list(run.failed) == [broken]
    assert "is not an image file ITK can read" in run.failed[broken]
    assert sorted(run.indexed) == sorted(str(sources / f"phantom_{seed}.nii.gz") for seed in PHANTOM_SEEDS)
    assert _rows(indexes["ray"][0])[broken]["error"] == run.failed[broken]


def test_ray_writes_one_shard_per_batch_beside_the_local_manifest(indexes):
    folder = indexes["ray"][0]
    shards = sorted(path.name for path in folder.glob("part-*.parquet"))
    assert len(shards) == 2  # 4 series in batches of 2
    assert all(name.startswith("part-00000-") for name in shards)
    assert not list(folder.glob("*.partial"))
    manifest = (folder / MANIFEST).read_text(encoding="utf-8")
    assert manifest == (indexes["local"][0] / MANIFEST).read_text(encoding="utf-8")
    dim = len(next(row["pooled"] for row in _rows(folder).values() if row["pooled"] is not None))
    assert (json.loads(manifest)["format"], json.loads(manifest)["embed_dim"]) == (FORMAT, dim)


def test_ray_resumes_indexing_only_new_and_failed_series(indexes, sources, analyzer, tmp_path):
    folder = tmp_path / "resumed"
    shutil.copytree(indexes["ray"][0], folder)
    before = _rows(folder)
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(sources / f"phantom_{PHANTOM_SEEDS[0]}.nii.gz", extra / "phantom_copy.nii.gz")
    entries = expand_sources([sources, extra])
    run = build_index_ray(entries, analyzer, folder, batch=2, progress=False)
    assert sorted(run.skipped) == sorted(str(sources / f"phantom_{seed}.nii.gz") for seed in PHANTOM_SEEDS)
    assert run.indexed == [str(extra / "phantom_copy.nii.gz")]
    assert list(run.failed) == [str(sources / UNREADABLE)]  # tried again, recorded again
    assert len(list(folder.glob("part-*.parquet"))) == 3  # one more batch: the copy and the broken file
    after = _rows(folder)
    for key, row in before.items():
        if row["error"] is None:
            assert after[key]["indexed_at"] == row["indexed_at"]  # the indexed series were not redone
    copy = after[str(extra / "phantom_copy.nii.gz")]["pooled"]
    original = before[str(sources / f"phantom_{PHANTOM_SEEDS[0]}.nii.gz")]["pooled"]
    np.testing.assert_allclose(copy, original, rtol=0, atol=1e-6)
    again = build_index_ray(entries, analyzer, folder, batch=2, progress=False)
    assert (len(again.indexed), len(again.skipped), list(again.failed)) == (0, 4, [str(sources / UNREADABLE)])


def test_ray_refuses_an_index_of_another_model(indexes, sources, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(indexes["ray"][0], folder)
    other = Analyzer(Engine("phantom", device="cpu", precision="fp32"))
    with pytest.raises(ValueError, match="one index holds one model"):
        build_index_ray(expand_sources([sources]), other, folder, progress=False)


@pytest.mark.parametrize(("device", "resources", "expected"), [
    ("cpu", {"CPU": 2.0}, (1, 0.0, 1.0, "cpu")),
    ("auto", {"CPU": 16.0}, (2, 0.0, 4.0, "cpu")),
    ("auto", {"CPU": 64.0, "GPU": 4.0}, (4, 1.0, 1.0, "cuda")),
    ("cuda", {"CPU": 8.0, "GPU": 1.0}, (1, 1.0, 1.0, "cuda")),
    ("cpu", {"CPU": 8.0, "GPU": 2.0}, (1, 0.0, 4.0, "cpu")),
])
def test_encoder_pool_takes_one_gpu_per_actor_or_half_the_cpus(device, resources, expected):
    assert encoder_placement(device, resources) == expected


def test_encoder_pool_refuses_devices_ray_cannot_place():
    with pytest.raises(RuntimeError, match="--device cuda, but the Ray cluster has no GPU"):
        encoder_placement("cuda", {"CPU": 4.0})
    with pytest.raises(ValueError, match='not "mps"; give --device auto, cuda or cpu'):
        encoder_placement("mps", {"CPU": 4.0})


@pytest.mark.parametrize(("gib", "expected"), [(80, 16), (24, 11), (8, 3), (4, 1), (2, 1)])
def test_gpu_batch_is_what_fits_beside_the_model(gib, expected):
    assert batch_for_gpu_memory(gib * 2**30) == expected


def test_a_batch_the_encoder_cannot_take_is_recorded_per_series_with_a_smaller_batch_hint(
        sources, analyzer, monkeypatch, tmp_path):
    import torch

    from COLIPRISlicerLib.encoding import encoder as encoding

    def out_of_memory(loaded, tensors, *, precision):
        raise torch.OutOfMemoryError(f"CUDA out of memory for {len(tensors)} inputs")

    monkeypatch.setattr(encoding, "run_image_encoder_batch", out_of_memory)
    run = build_index(expand_sources([sources]), analyzer, tmp_path / "index", progress=False, batch=2)
    assert run.indexed == [] and len(run.failed) == 4
    assert "is not an image file ITK can read" in run.failed[str(sources / UNREADABLE)]
    for seed in PHANTOM_SEEDS:
        message = run.failed[str(sources / f"phantom_{seed}.nii.gz")]
        assert message.startswith("OutOfMemoryError: CUDA out of memory for ")
        assert message.endswith("run again with a smaller --batch)")
    rows = _rows(tmp_path / "index")
    assert {key: row["error"] for key, row in rows.items()} == run.failed
    assert all(row["pooled"] is None for row in rows.values())


def test_index_command_runs_on_ray(ray_session, sources, tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from COLIPRISlicerLib.cli import app

    out = tmp_path / "index"
    arguments = ["index", str(sources), "--model", str(tiny_model_folder), "--out", str(out), "--engine", "ray",
                 "--device", "cpu", "--batch", "3", "--hide-progress"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert f"{out}: 3 indexed, 0 already there, 1 failed (recorded; run again to retry)" in result.output
    assert len(list(out.glob("part-00000-*.parquet"))) == 2  # 4 series in batches of 3
    assert sum(row["error"] is None for row in _rows(out).values()) == len(PHANTOM_SEEDS)


def test_missing_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install 'colipri-slicer\[cluster\]'"):
        ray_engine.require_ray()


def test_index_command_checks_engine_options(sources, tmp_path):
    from typer.testing import CliRunner

    from COLIPRISlicerLib.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["index", str(sources), "--out", str(tmp_path / "i"), "--ray-address", "ray://x:1"])
    assert result.exit_code == 1 and '--ray-address "ray://x:1" needs --engine ray' in result.output
    result = runner.invoke(app, ["index", str(sources), "--out", str(tmp_path / "i"), "--engine", "spark"])
    assert result.exit_code == 1 and 'Unknown --engine "spark"; choose local or ray' in result.output
    assert not (tmp_path / "i").exists()
