"""COLIPRISlicer engine: COLIPRI chest-CT zero-shot analysis, independent of Slicer.

Heavy dependencies (torch, colipri, transformers) load on first use, so importing this
package and running ``colipri-slicer --help`` stay fast.
"""

from .engine import Engine
from .volume import SliceMetadata, Volume, load_volume

__all__ = ["Engine", "SliceMetadata", "Volume", "load_volume"]
__version__ = "0.1.0"
