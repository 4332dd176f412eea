"""Acceptance figures of a model on held-out phantoms, through the same calls ``analyze`` makes.

Per phantom (seeds ``seed_base + i``, the generator's full random geometry): the analysis
(likelihoods), the draft report (re-read by the rule-based extractor), every report snippet
localised with ``method="auto"`` and, when the model ships a segmentation head, its labelmap.
Figures: zero-shot AUROC per planted finding; pointing accuracy per planted finding (the
heatmap's peak patch overlaps the finding's mask, on phantoms that have it); snippet MAE (all snippets, and the snippets
without an explicit image reference, i.e. the model's own work) beside the middle-slice
baseline; Dice of the head for lung nodules and pleural effusions on phantoms that have them;
clinical-efficacy precision/recall/F1 of the reports against ``truth.json``.
"""

from __future__ import annotations

import warnings

import numpy as np

from COLIPRISlicerLib.types import TypeStatusCallback

VALIDATION_SEED_BASE = 10_000_000
DICE_FINDINGS = ("Lung nodule", "Pleural effusion")


def evaluate_on_phantoms(model: str, *, n_val: int = 60, seed_base: int = VALIDATION_SEED_BASE,
                         device: str = "cpu", workers: int = 1,
                         status_callback: TypeStatusCallback | None = None) -> dict:
    """All acceptance figures of ``model`` on ``n_val`` phantoms (see the module docstring),
    analysed on ``device`` in fp32, the phantoms generated in ``workers`` processes."""
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.teaching.stream import phantom_stream

    analyzer = Analyzer(Engine(model, device=device, precision="fp32"))
    rows = []
    seeds = [seed_base + index for index in range(n_val)]
    for index, (volume, truth) in enumerate(phantom_stream(seeds, workers=workers)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # wide fields of view are cropped
            rows.append(_evaluate_one(analyzer, volume, truth))
        if status_callback is not None and (index + 1) % 10 == 0:
            status_callback(f"Evaluated {index + 1}/{n_val} phantoms")
    return {"model": analyzer.engine.identity.model_id, "label": analyzer.engine.identity.label,
            "validation_phantoms": n_val, "validation_seeds": f"{seed_base} + i",
            "zero_shot": _auroc_summary(rows), "pointing": _pointing_summary(rows),
            "localization": _localization_summary(rows),
            "segmentation_dice": _dice_summary(rows), "report": _report_summary(rows)}


def _evaluate_one(analyzer, volume, truth: dict) -> dict:
    from COLIPRISlicerLib.report.evaluation import extract_findings

    result = analyzer.analyze(volume)
    report = analyzer.report(result).to_markdown()
    slice_axis = int(np.argmax(np.abs(volume.ijk_to_ras[2, :3])))
    corners = volume.ijk_to_ras[2, slice_axis] * np.array([0, volume.shape[slice_axis] - 1]) + volume.ijk_to_ras[2, 3]
    snippets = [(entry, analyzer.localize(result, entry["text"])) for entry in truth["snippets"]]
    row = {"likelihoods": {f.name: f.likelihood for f in result.findings}, "truth": truth["findings"],
           "extracted": extract_findings(report), "middle_s": float(corners.mean()),
           "snippets": [(e["ras_s"], located.s_mm, located.method) for e, located in snippets],
           "pointing": _pointing(result, truth)}
    if analyzer.engine.extras.segmentation_head is not None:
        row["dice"] = _head_dice(analyzer.segment(result), truth)
    return row


def _pointing(result, truth: dict) -> dict[str, tuple[bool, bool]]:
    """Per planted finding present in ``truth``: (the heatmap's peak patch overlaps its mask,
    the mask covers at least one patch's volume)."""
    from COLIPRISlicerLib.findings.scoring import mask_to_patch_fraction

    grid, pointing = result.encoding.grid, {}
    for name, mask in truth["mask_arrays"].items():
        if not truth["findings"].get(name) or not mask.any():
            continue
        fractions = mask_to_patch_fraction(mask, result.volume, grid)
        patch = grid.ras_to_patch(result.finding(name).peak_ras)
        pointing[name] = (patch is not None and bool(fractions[patch] > 0), bool(fractions.sum() >= 1.0))
    return pointing


def _pointing_summary(rows: list[dict]) -> dict:
    """Pointing accuracy per finding: over every phantom that has it, and over those where it covers
    at least one patch's volume (the acceptance subset)."""
    from COLIPRISlicerLib.teaching.dataset import PLANTED_FINDINGS

    summary = {}
    for name in PLANTED_FINDINGS:
        cases = [row["pointing"][name] for row in rows if name in row.get("pointing", {})]
        large = [hit for hit, covers in cases if covers]
        if cases:
            summary[name] = {"accuracy": round(float(np.mean([hit for hit, _ in cases])), 4), "phantoms": len(cases),
                             "accuracy_covering_a_patch": round(float(np.mean(large)), 4) if large else None,
                             "phantoms_covering_a_patch": len(large)}
    return summary


def _head_dice(segmented, truth: dict) -> dict:
    dice = {}
    for name in DICE_FINDINGS:
        if name not in truth["mask_arrays"]:
            continue
        values = [label.value for label in segmented.labels if label.name == name]
        predicted = np.isin(segmented.labelmap, values)
        expected = truth["mask_arrays"][name]
        dice[name] = float(2 * (predicted & expected).sum() / max(1, predicted.sum() + expected.sum()))
    return dice


def _auroc_summary(rows: list[dict]) -> dict:
    from COLIPRISlicerLib.findings.calibration import auroc
    from COLIPRISlicerLib.teaching.dataset import PLANTED_FINDINGS

    per_finding = {}
    for name in PLANTED_FINDINGS:
        labels = np.array([row["truth"][name] for row in rows], float)
        if labels.min() != labels.max():
            per_finding[name] = round(auroc(labels, np.array([row["likelihoods"][name] for row in rows])), 4)
    values = list(per_finding.values())
    return {"per_finding_auroc": per_finding, "mean_auroc": round(float(np.mean(values)), 4) if values else None,
            "min_auroc": round(float(np.min(values)), 4) if values else None}


def _localization_summary(rows: list[dict]) -> dict:
    entries = [(true_s, found_s, method, row["middle_s"]) for row in rows for true_s, found_s, method in row["snippets"]]
    summary = {}
    for subset, keep in (("all_snippets", lambda method: True), ("without_reference", lambda m: m != "reference")):
        chosen = [e for e in entries if keep(e[2])]
        if chosen:
            true_s, found_s, middle = (np.array([entry[i] for entry in chosen], float) for i in (0, 1, 3))
            summary[subset] = {"snippets": len(chosen), "mae_mm": round(float(np.abs(found_s - true_s).mean()), 2),
                               "middle_slice_mae_mm": round(float(np.abs(middle - true_s).mean()), 2)}
    return summary


def _dice_summary(rows: list[dict]) -> dict | None:
    if not any("dice" in row for row in rows):
        return None
    summary = {}
    for name in DICE_FINDINGS:
        values = [row["dice"][name] for row in rows if name in row.get("dice", {})]
        if values:
            summary[name] = {"mean_dice": round(float(np.mean(values)), 4), "phantoms": len(values)}
    return summary


def _report_summary(rows: list[dict]) -> dict:
    from COLIPRISlicerLib.report.evaluation import clinical_efficacy

    return clinical_efficacy([row["extracted"] for row in rows], [row["truth"] for row in rows])


def format_summary(figures: dict) -> str:
    """Plain-text table of the acceptance figures."""
    lines = [f"{figures['model']} on {figures['validation_phantoms']} held-out phantoms ({figures['validation_seeds']})"]
    for name, value in figures["zero_shot"]["per_finding_auroc"].items():
        lines.append(f"  AUROC {name:<36} {value:.3f}")
    lines.append(f"  AUROC mean {figures['zero_shot']['mean_auroc']}, min {figures['zero_shot']['min_auroc']}")
    for name, entry in figures.get("pointing", {}).items():
        lines.append(f"  pointing {name:<33} {entry['accuracy']:.2f} over {entry['phantoms']} phantoms"
                     f" ({entry['accuracy_covering_a_patch']} over the {entry['phantoms_covering_a_patch']}"
                     " covering a patch)")
    for subset, entry in figures["localization"].items():
        lines.append(f"  snippets ({subset}, n={entry['snippets']}): MAE {entry['mae_mm']} mm"
                     f" (middle-slice baseline {entry['middle_slice_mae_mm']} mm)")
    for name, entry in (figures["segmentation_dice"] or {}).items():
        lines.append(f"  Dice {name}: {entry['mean_dice']:.3f} over {entry['phantoms']} phantoms")
    micro = figures["report"].get("micro", figures["report"])
    lines.append(f"  report clinical efficacy: {micro}")
    return "\n".join(lines)
