"""COLIPRISlicer engine: COLIPRI chest-CT zero-shot analysis, independent of Slicer.

Heavy dependencies (torch, colipri, transformers) load on first use, so importing this
package and running ``colipri-slicer --help`` stay fast.

Example:
    >>> from COLIPRISlicerLib import Analyzer, Engine, load_volume  # doctest: +SKIP
    >>> analyzer = Analyzer(Engine("microsoft/colipri"))  # doctest: +SKIP
    >>> result = analyzer.analyze(load_volume("chest.nii.gz"))  # doctest: +SKIP
    >>> result.finding("Pleural effusion").likelihood  # doctest: +SKIP
"""

from .analysis import AnalysisCancelled, AnalysisResult, Analyzer
from .findings.catalogue import Catalogue, Finding, load_catalogue
from .encoding.engine import Engine
from .io.volume import SliceMetadata, Volume, load_volume

__all__ = [
    "AnalysisCancelled", "AnalysisResult", "Analyzer", "Catalogue", "Engine", "Finding", "SliceMetadata", "Volume",
    "load_catalogue", "load_volume",
]
__version__ = "0.1.0"
