"""One analysis of one volume: encode once, then findings, heatmaps, report, segmentation
and snippet localisation on the cached embeddings. The Slicer Logic and the CLI call this."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.analysis_result import AnalysisResult
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.findings.catalogue import Catalogue, free_text_finding, load_catalogue
from COLIPRISlicerLib.findings.scoring import (
    FindingResult,
    score_findings,
)
from COLIPRISlicerLib.io.volume import Volume
from COLIPRISlicerLib.types import TypeStatusCallback

if TYPE_CHECKING:
    from COLIPRISlicerLib.localization.head import LocalizationHead
    from COLIPRISlicerLib.types import TypePath

logger = logging.getLogger(__name__)


class AnalysisCancelled(Exception):
    """Raised when a cancel event was set; nothing was produced."""


class Analyzer:
    """Runs analyses with one engine and one findings catalogue.

    Args:
        engine: an ``Engine``.
        catalogue: findings to score (default: the bundled 18 CT-RATE findings).
    """

    def __init__(self, engine: Engine, catalogue: Catalogue | None = None):
        self.engine = engine
        self._catalogue = catalogue

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r}, catalogue={'default' if self._catalogue is None else len(self._catalogue)})"

    @property
    def catalogue(self) -> Catalogue:
        """The catalogue given, else the bundled one with the model folder's calibrated thresholds."""
        if self._catalogue is None:
            extras = self.engine.extras
            self._catalogue = load_catalogue().with_thresholds(extras.thresholds, extras.not_learned)
        return self._catalogue

    def analyze(self, volume: Volume, *, cancel: threading.Event | None = None,
                status_callback: TypeStatusCallback | None = None) -> AnalysisResult:
        """Encode (or reuse the cached encoding) and score every catalogue finding.

        Raises:
            AnalysisCancelled: if ``cancel`` is set before the results are complete.
        """
        notify = status_callback or (lambda message: None)
        timings: dict[str, float] = {}
        _check(cancel)
        start = time.perf_counter()
        identity = self.engine.identity
        timings["model_load_s"] = time.perf_counter() - start
        _check(cancel)
        start = time.perf_counter()
        notify("Encoding")
        encoding = self.engine.encode(volume)
        timings["encode_s"] = time.perf_counter() - start
        _check(cancel)
        start = time.perf_counter()
        notify("Scoring")
        findings = score_findings(self.engine, encoding, list(self.catalogue), volume)
        self.engine.save_prompt_embeddings()  # a later reopen scores the catalogue without the text encoder
        timings["scoring_s"] = time.perf_counter() - start
        _check(cancel)
        return AnalysisResult(volume, encoding, findings, identity.as_dict(), timings, device=str(identity.device))

    def prepare_queries(self, result: AnalysisResult) -> None:
        """Do now what the first re-query would otherwise wait for: build the model (reopening a
        cached scan skips it), find the landmarks and the body patches snippets are scored on."""
        from COLIPRISlicerLib.localization.localize import body_patches

        _ = self.engine.loaded
        _ = result.landmarks
        body_patches(result.volume, result.encoding)

    def add_finding(self, result: AnalysisResult, text: str, **kwargs) -> FindingResult:
        """Score a free-text finding on the cached encoding and append it (replacing a namesake)."""
        finding = free_text_finding(text, **kwargs)
        scored = score_findings(self.engine, result.encoding, [finding], result.volume)[0]
        result.findings = [f for f in result.findings if f.slug != scored.slug] + [scored]
        result._heatmaps.pop(scored.slug, None)
        return scored

    def region_likelihoods(self, result: AnalysisResult, mask_ijk: np.ndarray, **kwargs) -> dict[str, float]:
        """Catalogue likelihoods restricted to a mask on the input grid."""
        from COLIPRISlicerLib.findings.scoring import region_likelihoods

        return region_likelihoods(self.engine, result.encoding, list(self.catalogue), result.volume, mask_ijk, **kwargs)

    def report(self, result: AnalysisResult):
        """Draft report composed from the findings (see ``report_builder``)."""
        from COLIPRISlicerLib.report.builder import build_report

        return build_report(self.engine, result)

    def segment(self, result: AnalysisResult, head: TypePath | None = None):
        """Segmentation with a trained head folder (default: the one shipped with the model, if any),
        or zero-shot from the finding heatmaps."""
        from COLIPRISlicerLib.segmentation.files import SegmentationResult
        from COLIPRISlicerLib.segmentation.head import load_head, predict, zero_shot_segmentation

        head = head if head is not None else self.engine.extras.segmentation_head
        if head is None:
            present = [f for f in result.findings if f.present]
            if not present:
                empty = np.zeros(result.volume.shape, np.int16)
                return SegmentationResult(empty, result.volume.ijk_to_ras, [], "zero-shot",
                                          "zero-shot: no finding is above its threshold, so nothing is labelled")
            return zero_shot_segmentation({f.name: f.logit_map for f in present}, result.encoding.grid, result.volume,
                                          colours={f.name: f.colour for f in present},
                                          terminologies={f.name: f.terminology for f in present})
        # load_head has loaded the model already (it checks the patch size), so the transform costs nothing
        return predict(load_head(head, self.engine), result.encoding, result.volume, self.engine.loaded.image_transform)

    def localize(self, result: AnalysisResult, text: str, *, method: str = "auto",
                 head: LocalizationHead | TypePath | None = None,
                 anatomy_weight: float | None = None):
        """Where a report snippet refers to (see ``localization.localize``)."""
        from COLIPRISlicerLib.localization.localize import localize

        return localize(self.engine, result.encoding, result.volume, text, method=method, head=head,
                        landmarks=result.landmarks, anatomy_weight=anatomy_weight)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise AnalysisCancelled("Analysis cancelled; no results were produced.")
