"""Benchmark one analysis on the full-size COLIPRI architecture (random weights) against
colipri's official pipeline, in one process, on a synthetic 512 x 512 x 300 CT.

Usage: .venv/bin/python bench/bench_analysis.py [--json FILE] [--bf16] [--slices 300] [--requery-only]
       [--device cpu|cuda] [--architecture full|tiny] [--official-calls 18] [--skip-reopen]

``--requery-only`` measures the re-query latencies alone, on an encoding kept in
``<bench dir>/requery-cache`` (encoded on the first such run, read from disk afterwards).

Real weights are used instead when ``--model`` names a cached or local COLIPRI. The vocabulary
comes from the bundled model folder (``Resources/Models/phantom/vocab.txt``, CXR-BERT's), so the
bench runs without ``../shared``. ``--architecture tiny`` keeps the model's 192^3 grid at 2 mm (so
preprocessing, heatmaps, report and snippets cost what they cost with COLIPRI) with a 2-layer,
48-wide encoder: the figures around the encoder on a CPU in minutes. On CUDA every timing is
bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))

FULL_SIZE = dict(input_size=192, spacing_mm=2.0, image_embed_dim=864, image_depth=16, image_heads=12,
                 projection_dim=768, text_layers=12, text_heads=12, text_intermediate=3072, seed=0)
#: COLIPRI's grid (192^3 at 2 mm, 8^3 patches) around a small encoder: the work around the encoder at full size.
TINY = dict(input_size=192, spacing_mm=2.0, image_embed_dim=48, image_depth=2, image_heads=2,
            projection_dim=32, text_layers=2, text_heads=2, text_intermediate=64, seed=0)
ARCHITECTURES = {"full": FULL_SIZE, "tiny": TINY}
VOCAB = REPO / "Resources" / "Models" / "phantom" / "vocab.txt"
#: Set by main(): the torch device whose queued work every timing waits for (CUDA is asynchronous).
SYNC_DEVICE: list = []
SNIPPETS = ["Nodule in the right lower lobe.", "Left pleural effusion.", "Mass near the carina (series 1, image 150).",
            "Enlarged heart.", "Calcified plaque of the aortic arch."]
#: Re-queries never seen before (each one is a new text-encoder forward pass).
NEW_FINDINGS = ["rib fracture with callus", "hiatal hernia", "pneumothorax at the apex", "thymoma", "azygos lobe"]
NEW_SNIPPETS = ["Small nodule in the left upper lobe.", "Bulla at the right apex.", "Subcarinal lymph node.",
                "Atelectasis at the left base.", "Thickened pleura along the right chest wall."]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def work_dir() -> Path:
    """Where random models and the bench CT are kept between runs (``$COLIPRISLICER_BENCH_DIR``)."""
    work = Path(os.environ.get("COLIPRISLICER_BENCH_DIR", Path.home() / ".cache" / "colipri-slicer" / "bench"))
    work.mkdir(parents=True, exist_ok=True)
    return work


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "gpu": gpu, "load_average_1min_at_start": os.getloadavg()[0]}


def random_model(folder: Path, vocab: Path, architecture: str = "full") -> Path:
    """A COLIPRI-architecture model folder with random weights (written once, then reused)."""
    from COLIPRISlicerLib.model.folder import SmallModelSpec, write_small_model

    if not (folder / "model.safetensors").is_file():
        write_small_model(folder, vocab, SmallModelSpec(**ARCHITECTURES[architecture]),
                          extra={"model_id": f"bench/{architecture}-size-random"})
    return folder


def synthetic_ct(slices: int):
    from COLIPRISlicerLib.io.volume import Volume

    rng = np.random.default_rng(0)
    shape = (512, 512, slices)
    i, j, k = np.ogrid[:512, :512, :slices]
    array = np.full(shape, -1000, np.int16)
    array[(((i - 256) / 230.0) ** 2 + ((j - 256) / 170.0) ** 2 < 1)[..., 0]] = 40
    for centre in (150, 362):
        array[((i - centre) / 90.0) ** 2 + ((j - 250) / 130.0) ** 2 + ((k - slices / 2) / (slices / 2.2)) ** 2 < 1] = -850
    array += rng.integers(-20, 20, shape, dtype=np.int16)
    ijk_to_ras = np.diag([-0.7, -0.7, 1.0, 1.0])  # stored LPS, as DICOM is
    ijk_to_ras[:3, 3] = [179.0, 179.0, -150.0]
    return Volume.from_array(array, ijk_to_ras, name="bench_ct")


def synchronize() -> None:
    """Wait for the GPU's queued work (no-op on the CPU)."""
    if SYNC_DEVICE:
        import torch

        torch.cuda.synchronize(SYNC_DEVICE[0])


def timed(function, *args, **kwargs):
    synchronize()
    start = time.perf_counter()
    value = function(*args, **kwargs)
    synchronize()
    return value, time.perf_counter() - start


def text_timing(engine) -> dict:
    import torch

    from COLIPRISlicerLib.findings.catalogue import load_catalogue

    prompts = [p for f in load_catalogue() for p in f.prompts[1]]
    loaded = engine.loaded
    device = next(loaded.model.parameters()).device
    padded = loaded.tokenizer(prompts, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference, pad_s = timed(loaded.model.encode_text, padded["input_ids"].to(device),
                                 padded["attention_mask"].to(device))
    engine._prompts.clear()
    ours, dynamic_s = timed(engine.embed_prompts, prompts)
    difference = (ours.to(reference.device) - reference.float()).abs().max()
    return {"text_prompts": len(prompts), "text_pad512_s": pad_s, "text_dynamic_s": dynamic_s,
            "text_speedup_vs_pad512": pad_s / dynamic_s, "text_max_abs_diff": float(difference)}


def official_timing(model_folder: Path, scan: Path, device: str, calls: int) -> dict:
    """colipri's own pipeline, one call per finding as its model card does (warm: after one call),
    fp32 and under bf16 autocast. ``calls`` of the 18 are timed; the 18-call figure scales them."""
    import torch

    sys.path.insert(0, str(REPO / "Testing"))
    from conftest import official_pipeline

    from COLIPRISlicerLib.findings.catalogue import load_catalogue

    findings = [f.name for f in load_catalogue()][:calls]
    def load():
        pipeline = official_pipeline(model_folder)
        pipeline._model.to(device)  # colipri's encoders move their inputs to the model's device
        return pipeline

    pipeline, load_s = timed(load)
    pairs = [[f"{name} is not present.", f"{name} is present."] for name in findings]
    result, warm_s = timed(pipeline, str(scan), pairs[0])
    figures = {"official_load_s": load_s, "official_first_call_s": warm_s, "official_calls_timed": len(findings),
               "official_effusion_probability": result[1]["score"]}
    for label, autocast in (("", False), ("_bf16", True)):
        def run_all():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                return [pipeline(str(scan), pair) for pair in pairs]
        _, seconds = timed(run_all)
        figures[f"official_pipeline{label}_s"] = seconds / len(findings)
        figures[f"official_pipeline_18_findings{label}_s"] = 18 * seconds / len(findings)
    return figures


def reopen_timing(model: str, scan: Path, cache_dir: Path, device: str) -> dict:
    """Same scan in a new process with the on-disk cache: imports, reading the file, analysis call -> results.

    ``reopen_s`` runs from the analysis call to the scored findings (what a user waits for
    after the volume is loaded); reading the file and the imports are reported separately, and
    so is whether the heavy packages (colipri, transformers, torchio) were needed at all.
    """
    code = f"""
import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, {str(REPO / 'COLIPRISlicer')!r})
from COLIPRISlicerLib import Engine, load_volume
from COLIPRISlicerLib.analysis import Analyzer
import torch
t1 = time.perf_counter()
volume = load_volume({str(scan)!r})
t2 = time.perf_counter()
engine = Engine({model!r}, device={device!r}, precision="fp32", cache_dir={str(cache_dir)!r})
result = Analyzer(engine).analyze(volume)
t3 = time.perf_counter()
heavy = [name for name in ("colipri", "transformers", "torchio") if name in sys.modules]
print(json.dumps({{"import_s": t1 - t0, "reopen_read_scan_s": t2 - t1, "reopen_s": t3 - t2,
                  "reopen_forward_passes": engine.image_forward_count, "reopen_model_built": engine.model_is_loaded,
                  "reopen_heavy_imports": heavy}}))
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model", help="model spec; default: random weights of --architecture")
    parser.add_argument("--architecture", default="full", choices=sorted(ARCHITECTURES),
                        help="random model: COLIPRI's full size, or its 192^3 grid around a tiny encoder")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--bf16", action="store_true", help="also encode with bf16 autocast (another encode)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--official-calls", type=int, default=18,
                        help="official pipeline calls timed per precision (of the 18 findings; the 18-call figure scales)")
    parser.add_argument("--skip-reopen", action="store_true", help="no new-process reopen from the disk cache")
    parser.add_argument("--requery-only", action="store_true", help="only the re-query latencies (cached encoding)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engine runs")
    parser.add_argument("--requery-precision", default="fp32", choices=["fp32", "bf16"],
                        help="precision of the --requery-only engine (bf16: image and text encoders)")
    args = parser.parse_args()
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False).")
        SYNC_DEVICE.append(torch.device("cuda"))
    work = work_dir()
    figures: dict = {"machine": machine(), "command": " ".join(sys.argv[1:])}
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.export.outputs import write_volume

    folder_name = "full-size-random" if args.architecture == "full" else f"{args.architecture}-size-random"
    model = args.model or str(random_model(work / folder_name, VOCAB, args.architecture))
    figures["architecture"] = "given" if args.model else args.architecture
    volume, figures["synthetic_volume_s"] = timed(synthetic_ct, args.slices)
    scan = work / f"bench_ct_{args.slices}.nii.gz"
    if not scan.exists():
        write_volume(volume.array, volume.ijk_to_ras, scan)
    if args.requery_only:
        figures.update(requery_only(Engine(model, device=args.device, precision=args.requery_precision,
                                           cache_dir=work / "requery-cache"), volume))
        print(format_table(figures))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=work))
    engine = Engine(model, device=args.device, precision="fp32", cache_dir=cache_dir)
    _, figures["model_load_s"] = timed(lambda: engine.loaded)
    figures.update(preprocess_timing(engine, volume))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    figures.update(first_analysis(engine, volume))
    pair = figures.pop("_result")
    figures.update(warm_analysis(engine, volume))
    figures.update(requery(engine, pair))
    figures.update(text_timing(engine))
    if args.device == "cuda":
        figures["gpu_name"] = torch.cuda.get_device_name(0)
        figures["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3  # one analysis and its re-queries
    figures["peak_rss_gb"] = peak_rss_gb()  # the engine alone: model, encoding, 18 heatmaps, report, snippets
    figures.update(mrml_import_timing(pair, scan))
    figures["peak_rss_with_mrml_scene_gb"] = peak_rss_gb()
    if args.bf16:
        figures.update(bf16_difference(model, volume, figures["_likelihoods"], args.device))
    figures.pop("_likelihoods")
    if not args.skip_reopen:
        figures.update(reopen_timing(model, scan, cache_dir, args.device))
    if not args.skip_official and not args.model:
        del engine, pair
        figures.update(official_timing(Path(model), scan, args.device, args.official_calls))
        figures["official_over_first_analysis"] = figures["official_pipeline_18_findings_s"] / figures["first_analysis_s"]
    figures["load_average_1min_at_end"] = os.getloadavg()[0]  # other work on a shared machine skews every figure
    print(format_table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def preprocess_timing(engine, volume) -> dict:
    """The fast path and TorchIO's (reference) on the same volume, and how far apart their outputs are."""
    from COLIPRISlicerLib.preprocessing import preprocess

    transform = engine.loaded.image_transform
    device = engine.identity.device
    preprocess(volume, transform, device=device)  # warm-up: kernels, allocator
    fast, fast_s = timed(preprocess, volume, transform, device=device)
    reference, reference_s = timed(preprocess, volume, transform, method="reference")
    difference = (fast.tensor.cpu() - reference.tensor).abs()
    return {"preprocess_s": fast_s, "preprocess_reference_s": reference_s,
            "preprocess_speedup": reference_s / fast_s, "preprocess_max_abs_diff": float(difference.max()),
            "preprocess_voxels_differing": int((difference > 0).sum())}


def on_input_grid(result, finding):
    """A finding's heatmap on the input grid, where the engine computes it (the GPU keeps it there)."""
    from COLIPRISlicerLib.findings.scoring import heatmap_where_computed

    return heatmap_where_computed(finding, result.encoding.grid, result.volume, result.device)


def first_analysis(engine, volume) -> dict:
    from COLIPRISlicerLib.analysis import Analyzer

    analyzer = Analyzer(engine)
    synchronize()
    start = time.perf_counter()
    result, analyze_s = timed(analyzer.analyze, volume)
    shown_s = timed(lambda: result.heatmap(result.findings[0].name).shape)[1]  # the one heatmap the module shows
    report_s = timed(analyzer.report, result)[1]
    localise_s = timed(lambda: [analyzer.localize(result, s) for s in SNIPPETS])[1]
    synchronize()
    total = time.perf_counter() - start
    heatmaps_s = timed(lambda: [on_input_grid(result, f).shape for f in result.findings])[1]
    encoder = result.encoding.encode_seconds
    return {"first_analysis_s": total, "encoder_s": encoder, "first_analysis_except_encoder_s": total - encoder,
            "non_encoder_fraction": (total - encoder) / total, "analyze_s": analyze_s,
            "scoring_s": result.timings["scoring_s"], "heatmap_shown_on_input_grid_s": shown_s,
            "heatmaps_18_on_input_grid_s": heatmaps_s, "report_s": report_s,
            "localise_5_snippets_s": localise_s, "_result": (analyzer, result),
            "_likelihoods": np.array([f.likelihood for f in result.findings])}


def warm_analysis(engine, volume) -> dict:
    """The same first analysis of another volume on the now warm engine (kernels chosen, catalogue
    prompts embedded), as every later *Analyze* of a session runs: ``warm_*`` figures."""
    from COLIPRISlicerLib.io.volume import Volume

    other = Volume.from_array(np.ascontiguousarray(volume.array[:, :, ::-1]), volume.ijk_to_ras, name="bench_ct_2")
    figures = first_analysis(engine, other)
    for key in ("_result", "_likelihoods", "heatmaps_18_on_input_grid_s"):
        figures.pop(key)
    return {f"warm_{key}": value for key, value in figures.items()}


#: Seconds between two user actions in the re-query loop. numpy's OpenBLAS threads spin for
#: ~0.1 s after a GEMM (the heatmap resampling) and slow a torch pass started within that time
#: about 2x (measured: 144-173 ms instead of 67 ms); a person never types that fast.
USER_PAUSE_S = 0.5


def requery(engine, pair) -> dict:
    """Latencies of new texts on the cached volume, as the module runs them: a free-text finding
    (likelihood + patch heatmap), its heatmap onto the input grid, then a snippet -> slice.
    Medians (and maxima) over :data:`NEW_FINDINGS` / :data:`NEW_SNIPPETS`, with
    :data:`USER_PAUSE_S` between actions; the snippet is also timed right after the resampling
    (``..._back_to_back_ms``). No image forward pass."""
    analyzer, result = pair
    count = engine.image_forward_count
    times: dict[str, list[float]] = {"finding": [], "resample": [], "snippet": [], "back_to_back": []}

    def measure(key: str, call, pause: bool = True) -> None:
        if pause:
            time.sleep(USER_PAUSE_S)
        times[key].append(1000 * timed(call)[1])

    for finding, snippet in zip(NEW_FINDINGS, NEW_SNIPPETS):
        measure("finding", lambda: analyzer.add_finding(result, finding))
        measure("resample", lambda: on_input_grid(result, result.findings[-1]).shape)
        measure("back_to_back", lambda: analyzer.localize(result, snippet + " Again."), pause=False)
        measure("snippet", lambda: analyzer.localize(result, snippet))
    assert engine.image_forward_count == count, "a re-query ran the image encoder"
    return {"requery_ms": float(np.median(times["finding"])), "requery_max_ms": max(times["finding"]),
            "requery_snippet_ms": float(np.median(times["snippet"])), "requery_snippet_max_ms": max(times["snippet"]),
            "requery_snippet_back_to_back_ms": float(np.median(times["back_to_back"])),
            "requery_heatmap_resample_ms": float(np.median(times["resample"])), "requery_count": len(times["finding"])}


def requery_only(engine, volume) -> dict:
    from COLIPRISlicerLib.analysis import Analyzer

    analyzer = Analyzer(engine)
    result, seconds = timed(analyzer.analyze, volume)
    report_s = timed(analyzer.report, result)[1]  # the module's run: analysis + draft report,
    prepare_s = timed(analyzer.prepare_queries, result)[1]  # then this, in the background
    return {"analysis_s": seconds, "report_s": report_s, "prepare_queries_s": prepare_s,
            "encoded_now": engine.image_forward_count > 0, **requery(engine, (analyzer, result))}


#: Imports after the first (``mrml_reimport_s``: their median): what every later *Analyze* of the
#: volume does, replacing the nodes of the one before (the segmentation's deletion included).
MRML_REIMPORTS = 3


def mrml_import_timing(pair, scan: Path) -> dict:
    """Import the results into a real MRML scene (``slicer-core``): table, chart, report, one
    heatmap (computed before the clock starts and handed over, as the module's worker does), the
    segmentation. Skipped (empty) when slicer-core is not installed."""
    try:
        sys.path.insert(0, str(REPO / "Testing"))
        import slicer_harness
    except ImportError:
        return {}
    analyzer, result = pair
    segmentation = analyzer.segment(result)
    report = analyzer.report(result).to_markdown()
    saved = slicer_harness.install_module_stubs()
    try:
        from COLIPRISlicerLib.findings.scoring import heatmap_on_host
        from COLIPRISlicerNodes import importer

        with slicer_harness.SlicerTestScene():
            node = slicer_harness.load_volume_file(scan, "bench_ct")
            seconds = []
            for _ in range(1 + MRML_REIMPORTS):  # the first import, then re-Analyze: each replaces the last
                finding = result.findings[0]  # the map as the module's worker computes it
                heatmap = heatmap_on_host(finding, result.encoding.grid, result.volume, result.device)
                start = time.perf_counter()
                importer.import_analysis(node, result.findings, report, result.model)
                importer.import_heatmap(node, heatmap, finding.name, adopt=True)  # as the module does
                importer.import_segmentation(node, segmentation)
                seconds.append(time.perf_counter() - start)
    finally:
        slicer_harness.remove_module_stubs(saved)
    return {"mrml_import_s": seconds[0], "mrml_reimport_s": float(np.median(seconds[1:])),
            "mrml_reimport_max_s": max(seconds[1:]), "segmentation_labelled_fraction": float((segmentation.labelmap > 0).mean())}


def bf16_difference(model: str, volume, fp32_likelihoods: np.ndarray, device: str) -> dict:
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine

    engine = Engine(model, device=device, precision="bf16")
    result, seconds = timed(Analyzer(engine).analyze, volume)
    bf16 = np.array([f.likelihood for f in result.findings])
    return {"bf16_encoder_s": result.encoding.encode_seconds, "bf16_max_abs_likelihood_diff": float(np.abs(bf16 - fp32_likelihoods).max())}


def format_table(figures: dict) -> str:
    lines = ["| measure | value |", "|---|---|"]
    for key, value in figures.items():
        text = f"{value:.3f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else str(value)
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
