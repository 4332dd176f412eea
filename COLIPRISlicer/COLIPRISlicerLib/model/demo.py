"""The untrained demo model: COLIPRI's architecture, small and randomly initialised.

It lets every feature run offline on any machine (teaching, CI, first contact) and is
labelled everywhere as what it is: random weights, not COLIPRI, not for clinical use. Its
vocabulary is built from the project's own catalogue words plus single characters, so any
text tokenises without unknown tokens.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from COLIPRISlicerLib.defaults import user_cache_dir, resources_dir
from COLIPRISlicerLib.model.folder import SmallModelSpec, write_small_model

DEMO_VERSION = "v1"
DEMO_LABEL = "untrained demo model (random weights) - not COLIPRI, not for clinical use"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def demo_model_folder() -> Path:
    return user_cache_dir() / "models" / f"demo-untrained-{DEMO_VERSION}"


def ensure_demo_model() -> Path:
    """Create the demo model folder on first use (about 10 s) and return it."""
    folder = demo_model_folder()
    if (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    vocab = staging / "demo_vocab.txt"
    vocab.write_text("\n".join(demo_vocabulary()) + "\n", encoding="utf-8")
    extra = {"model_id": "colipri-slicer/demo-untrained", "revision": DEMO_VERSION, "label": DEMO_LABEL}
    write_small_model(staging, vocab, SmallModelSpec(seed=20261122), extra=extra)
    vocab.unlink()
    if not folder.exists():
        staging.replace(folder)
    return folder


def demo_vocabulary() -> list[str]:
    """Special tokens (CXR-BERT ids 0-4), characters, '##' continuations, catalogue words."""
    words: set[str] = set()
    catalogues = resources_dir() / "Catalogues"
    for path in sorted(catalogues.glob("*.yaml")):
        words.update(re.findall(r"[a-z]+", path.read_text(encoding="utf-8").lower()))
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    continuations = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    return SPECIAL_TOKENS + characters + continuations + sorted(words - set(characters))
