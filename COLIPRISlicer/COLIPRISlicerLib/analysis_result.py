"""The result of one analysis: the volume, its encoding and scored findings; heatmaps on the
input grid and landmarks computed on request and kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.findings.scoring import FindingResult, heatmap_where_computed
from COLIPRISlicerLib.io.volume import Volume


@dataclass
class AnalysisResult:
    """Results for one volume. Heatmaps on the input grid are computed on request and kept
    (on ``device`` when it is a GPU: copied to the CPU only when asked for as an array)."""

    volume: Volume
    encoding: ImageEncoding
    findings: list[FindingResult]
    model: dict
    timings: dict[str, float] = field(default_factory=dict)
    _heatmaps: dict[str, object] = field(default_factory=dict, repr=False)
    _landmarks: list = field(default_factory=list, repr=False)
    device: str = "cpu"

    def finding(self, name: str) -> FindingResult:
        for result in self.findings:
            if result.name.lower() == name.lower() or result.slug == name:
                return result
        raise KeyError(f'No finding "{name}" in this analysis; available: {[f.name for f in self.findings]}')

    def heatmap(self, name: str) -> np.ndarray:
        """(I, J, K) float32 heatmap of a finding on the input grid (NaN outside the field of view)."""
        heatmap = self.heatmap_tensor(name)
        return heatmap if isinstance(heatmap, np.ndarray) else heatmap.cpu().numpy()

    def heatmap_tensor(self, name: str):
        """The heatmap where it was computed: an (I, J, K) float32 tensor on a GPU ``device``, else
        the numpy array of :meth:`heatmap`."""
        result = self.finding(name)
        if result.slug not in self._heatmaps:
            self._heatmaps[result.slug] = heatmap_where_computed(result, self.encoding.grid, self.volume, self.device)
        return self._heatmaps[result.slug]

    @property
    def landmarks(self):
        """Intensity-based anatomical landmarks of the input volume (computed once)."""
        if not self._landmarks:
            from COLIPRISlicerLib.localization.landmarks import detect_landmarks

            self._landmarks.append(detect_landmarks(self.volume.array, self.volume.ijk_to_ras))
        return self._landmarks[0]
