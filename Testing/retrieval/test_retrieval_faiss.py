"""FAISS search backend (retrieval/backends.py): the same hits as exact numpy search, ``auto``'s choice,
and ``search --backend faiss`` end to end, on an index of 20,000 random unit 64-d vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from COLIPRISlicerLib.cli import app
from COLIPRISlicerLib.retrieval import backends
from COLIPRISlicerLib.retrieval.index import _TEXT_COLUMNS, FORMAT, MANIFEST, write_shard
from COLIPRISlicerLib.retrieval.regions import REGIONS
from COLIPRISlicerLib.retrieval.search import SearchIndex

pytest.importorskip("faiss", reason="faiss-cpu is not installed: pip install 'colipri-slicer[faiss]'")

COUNT, DIM = 20_000, 64
FINDINGS = ["Pleural effusion", "Cardiomegaly"]
WHERE = "Pleural effusion>0.7 and Cardiomegaly<0.5"
runner = CliRunner()


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    rows = rng.standard_normal((count, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def random_index(tmp_path_factory) -> Path:
    """An index folder of COUNT series: random unit pooled vectors, lungs vectors on even rows only,
    uniform likelihoods; written with ``write_shard`` as ``index`` does."""
    folder = tmp_path_factory.mktemp("faiss") / "index"
    folder.mkdir()
    rng = np.random.default_rng(27)
    pooled, lungs, likelihoods = unit_rows(rng, COUNT), unit_rows(rng, COUNT), rng.random((COUNT, 2))
    manifest = {"format": FORMAT, "model": "phantom", "regions": list(REGIONS), "findings": FINDINGS,
                "embed_dim": DIM}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    empty = dict.fromkeys(_TEXT_COLUMNS)
    rows = [{**empty, "key": f"series-{i}", "source": f"/scans/{i}.nii.gz", "pooled": pooled[i],
             "lungs": lungs[i] if i % 2 == 0 else None, **dict(zip(FINDINGS, map(float, likelihoods[i])))}
            for i in range(COUNT)]
    write_shard(rows, folder / "part-00000.parquet", manifest)
    return folder


@pytest.fixture(scope="module")
def searched(random_index) -> SearchIndex:
    return SearchIndex(random_index)


@pytest.mark.parametrize("region", [None, "lungs"])
@pytest.mark.parametrize("where", [None, WHERE])
def test_faiss_gives_the_exact_top_10_keys_and_scores(searched, region, where):
    rng = np.random.default_rng(3)
    allowed = 0
    for query in rng.standard_normal((5, DIM)).astype(np.float32):  # not normalised: cosine either way
        exact = searched.search(query, region=region, where=where, k=10, backend="exact")
        fast = searched.search(query, region=region, where=where, k=10, backend="faiss")
        assert [hit.source for hit in fast] == [hit.source for hit in exact] and len(exact) == 10
        np.testing.assert_allclose([hit.score for hit in fast], [hit.score for hit in exact], atol=1e-5)
        allowed += all(hit.likelihoods["Pleural effusion"] > 0.7 and hit.likelihoods["Cardiomegaly"] < 0.5
                       for hit in fast)
        if region == "lungs":  # rows without a lungs vector are never hits
            assert all(int(Path(hit.source).name.split(".")[0]) % 2 == 0 for hit in fast)
    assert where is None or allowed == 5


def test_faiss_scores_are_the_cosines_of_the_hits(searched):
    query = searched.vectors["pooled"][123] * 3.0
    hits = searched.search(query, k=3, backend="faiss")
    assert hits[0].source == "/scans/123.nii.gz" and abs(hits[0].score - 1.0) < 1e-5
    second = searched.vectors["pooled"][int(Path(hits[1].source).name.split(".")[0])]
    assert abs(hits[1].score - float(second @ searched.vectors["pooled"][123])) < 1e-5


def test_faiss_returns_fewer_hits_when_fewer_rows_are_allowed(searched):
    where = "Pleural effusion>0.9995"
    expected = int((searched.likelihoods[:, 0] > 0.9995).sum())
    assert 0 < expected < 20
    fast = searched.search(np.ones(DIM), where=where, k=20, backend="faiss")
    exact = searched.search(np.ones(DIM), where=where, k=20, backend="exact")
    assert [hit.source for hit in fast] == [hit.source for hit in exact] and len(fast) == expected
    assert searched.search(np.ones(DIM), where="Pleural effusion>1.5", backend="faiss") == []


def test_auto_is_exact_below_the_threshold_and_faiss_above(searched, monkeypatch):
    assert backends.choose_backend("auto", COUNT) == "exact"
    assert backends.choose_backend("auto", backends.FAISS_THRESHOLD + 1) == "faiss"
    calls = []
    real = backends.faiss_top_k
    monkeypatch.setattr("COLIPRISlicerLib.retrieval.search.faiss_top_k",
                        lambda *args: calls.append(1) or real(*args))
    searched.search(np.ones(DIM), backend="auto")
    assert calls == []
    monkeypatch.setattr(backends, "FAISS_THRESHOLD", COUNT - 1)
    searched.search(np.ones(DIM), backend="auto")
    assert calls == [1]


def test_auto_without_faiss_warns_once_and_searches_exactly(monkeypatch, caplog):
    monkeypatch.setattr(backends, "faiss_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert backends.choose_backend("auto", 5_000_000, 768) == "exact"
    assert len(caplog.records) == 1 and "pip install 'colipri-slicer[faiss]'" in caplog.text
    assert "(about 5.0 s per query)" in caplog.text  # 5M x 768 values at 1.3 ns each


def test_cli_search_backend_faiss_matches_exact(random_index):
    def search(*args):
        result = runner.invoke(app, ["search", str(random_index), "--like", "series-42", "-k", "5", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    fast, exact = search("--backend", "faiss", "--where", WHERE), search("--backend", "exact", "--where", WHERE)
    assert [hit["source"] for hit in fast] == [hit["source"] for hit in exact]
    np.testing.assert_allclose([hit["score"] for hit in fast], [hit["score"] for hit in exact], atol=1e-5)
    assert search("--backend", "faiss")[0]["source"] == "/scans/42.nii.gz"


def test_cli_refuses_faiss_when_it_is_missing_and_an_unknown_backend(random_index, monkeypatch):
    monkeypatch.setattr(backends, "faiss_available", lambda: False)
    missing = runner.invoke(app, ["search", str(random_index), "--like", "series-1", "--backend", "faiss"])
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines()[-1].endswith("pip install 'colipri-slicer[faiss]'")
    unknown = runner.invoke(app, ["search", str(random_index), "--like", "series-1", "--backend", "annoy"])
    assert unknown.exit_code == 1 and 'Unknown search backend "annoy"; choose one of exact, faiss, auto' in unknown.output
