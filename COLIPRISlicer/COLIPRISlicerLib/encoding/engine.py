"""The engine: one loaded model, cached encodings and prompts, zero-shot scores and maps."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from COLIPRISlicerLib import defaults
from COLIPRISlicerLib.encoding.cache import EncodingCache, PromptStore, numbers_version
from COLIPRISlicerLib.encoding.encoder import ImageEncoding, run_image_encoder
from COLIPRISlicerLib.types import TypeStatusCallback
from COLIPRISlicerLib.io.volume import Volume

logger = logging.getLogger(__name__)

TypePromptPair = tuple[str, str]


class Engine:
    """Runs COLIPRI on volumes; the model loads on first use and stays loaded.

    Args:
        model: model spec (``microsoft/colipri``, a model folder, or ``demo``).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        precision: ``auto``, ``bf16`` or ``fp32`` (image and text encoders).
        cache_dir: folder for the on-disk encoding cache, or None for memory only.
        cache_max_bytes: size bound of that folder's encodings (least recently used go first); None: none.
        status_callback: receives one line per long step.
        preprocessing: ``fast`` (torch, on ``device``; see ``preprocessing``) or ``reference``
            (colipri's TorchIO transform on the CPU).

    Example:
        >>> engine = Engine("demo")  # doctest: +SKIP
        >>> encoding = engine.encode(load_volume("chest.nii.gz"))  # doctest: +SKIP
        >>> engine.pair_probabilities(encoding, [("No effusion.", "Effusion.")])  # doctest: +SKIP
    """

    def __init__(self, model: str = defaults.DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto",
                 cache_dir: str | Path | None = None, cache_max_bytes: int | None = None,
                 status_callback: TypeStatusCallback | None = None, preprocessing: str = "fast"):
        from COLIPRISlicerLib.preprocessing import PREPROCESSING_METHODS

        if preprocessing not in PREPROCESSING_METHODS:
            message = f'Unknown preprocessing "{preprocessing}"; choose one of {", ".join(PREPROCESSING_METHODS)}.'
            raise ValueError(message)
        self.preprocessing = preprocessing
        self.spec = str(model)
        self.device = device
        self.precision = precision
        self.status_callback = status_callback
        self.cache = EncodingCache(defaults.IMAGE_CACHE_SIZE)
        self.image_forward_count = 0
        self._description = None
        self._loaded = None
        self._prompts = None
        self._prompt_store = None
        self.use_cache_dir(cache_dir, cache_max_bytes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.spec!r}, device={self.device!r}, precision={self.precision!r})"

    def use_cache_dir(self, cache_dir: str | Path | None, cache_max_bytes: int | None = None) -> None:
        """Keep encodings and prompt embeddings in ``cache_dir`` from now on (None: memory only)."""
        self.cache.folder = Path(cache_dir) if cache_dir else None
        self.cache.max_disk_bytes = cache_max_bytes
        self._prompt_store = PromptStore(Path(cache_dir)) if cache_dir else None

    def _notify(self, message: str) -> None:
        logger.debug(message)
        if self.status_callback is not None:
            self.status_callback(message)

    @property
    def description(self):
        """The ``ModelDescription`` (identity, preprocessing signature, temperature) without building the model."""
        if self._description is None:
            from COLIPRISlicerLib.model.loading import describe_model

            self._description = describe_model(self.spec, device=self.device, precision=self.precision,
                                               status_callback=self.status_callback)
        return self._description

    @property
    def loaded(self):
        """The ``LoadedModel`` (built and loaded on first access: only when something is not cached)."""
        if self._loaded is None:
            from COLIPRISlicerLib.model.loading import load_model
            from COLIPRISlicerLib.encoding.text import PromptEncoder

            self._loaded = load_model(self.spec, status_callback=self.status_callback, description=self.description)
            self._prompts = PromptEncoder(self._loaded.model, self._loaded.tokenizer)
        return self._loaded

    @property
    def model_is_loaded(self) -> bool:
        """Whether the model has been built (a re-opened cached scan with cached prompts never needs it)."""
        return self._loaded is not None

    @property
    def identity(self):
        return self._loaded.identity if self._loaded is not None else self.description.identity

    @property
    def extras(self):
        """What the model folder brings besides weights (calibrated thresholds, a segmentation head)."""
        return self.description.resolved.extras

    @property
    def temperature(self) -> float:
        if self._loaded is not None:
            return float(self._loaded.model.softmax_temperature)
        return self.description.temperature

    def cache_key(self, volume: Volume) -> str:
        """Everything that changes an encoding: voxels, geometry, weights, preprocessing, device, dtype, versions."""
        identity = self.identity
        parts = (volume.content_hash(), identity.sha256, self.description.processor_signature, identity.device,
                 identity.dtype, numbers_version())
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def encode(self, volume: Volume) -> ImageEncoding:
        """Preprocess and encode a volume, or return the cached encoding."""
        key = self.cache_key(volume)
        metadata = {"volume": volume.name, "shape": list(volume.shape), "model": self.identity.model_id}
        return self.cache.get_or_compute(key, lambda: self._encode_uncached(volume, key), metadata)

    def _encode_uncached(self, volume: Volume, key: str) -> ImageEncoding:
        from COLIPRISlicerLib.preprocessing import preprocess

        loaded = self.loaded
        self._notify("Preprocessing")
        processed = preprocess(volume, loaded.image_transform, method=self.preprocessing, device=self.identity.device)
        self._notify("Encoding")
        pooled, dense, features, seconds = self._forward_with_cpu_fallback(processed.tensor)
        self.image_forward_count += 1
        return ImageEncoding(pooled, dense, features, processed.tensor.cpu(), processed.patch_grid(loaded.patch_size),
                             processed.cropped_mm, key, seconds)

    def _forward_with_cpu_fallback(self, tensor):
        from COLIPRISlicerLib.model.devices import out_of_memory_errors

        try:
            return run_image_encoder(self.loaded, tensor, precision=self.identity.dtype)
        except out_of_memory_errors():
            message = (
                f"Out of GPU memory on {self.identity.device}; retrying on the CPU (slower)."
                " Close other GPU programs or choose the CPU device to avoid this."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self._move_to_cpu()
            return run_image_encoder(self.loaded, tensor, precision=self.identity.dtype)

    def _move_to_cpu(self) -> None:
        import dataclasses

        import torch

        from COLIPRISlicerLib.model.loading import select_precision

        loaded = self.loaded
        loaded.model.to("cpu")
        loaded.dense_pooler.to("cpu")
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        loaded.identity = dataclasses.replace(loaded.identity, device="cpu", dtype=select_precision(self.precision, cpu))
        self._prompts.clear()  # embedded in the GPU's precision

    def embed_prompts(self, prompts: Sequence[str]):
        """(N, embed_dim) float32 normalised prompt embeddings (memory cache, then disk, then the text encoder)."""
        if self._prompt_store is not None and self._prompts is None:
            stored = self._prompt_store.get(self._prompt_table(), prompts)
            if stored is not None:
                return stored
        _ = self.loaded
        embeddings = self._prompts.embed(prompts, precision=self.identity.dtype)
        if self._prompt_store is not None:
            self._prompt_store.put(self._prompt_table(), prompts, embeddings)
        return embeddings

    def _prompt_table(self) -> str:
        """Stored prompt embeddings belong to one set of weights and one text precision."""
        return f"{self.identity.sha256}:{self.identity.dtype}:{numbers_version()}"

    def save_prompt_embeddings(self) -> None:
        """Write the prompt embeddings computed so far to the on-disk cache (when there is one)."""
        if self._prompt_store is not None:
            self._prompt_store.flush()

    @property
    def text_forward_count(self) -> int:
        return 0 if self._prompts is None else self._prompts.forward_count

    def pair_embeddings(self, pairs: Sequence[TypePromptPair]):
        if not pairs:
            raise ValueError("No prompt pairs given.")
        embeddings = self.embed_prompts([text for pair in pairs for text in pair])
        return embeddings[0::2], embeddings[1::2]

    def pair_probabilities(self, encoding: ImageEncoding, pairs: Sequence[TypePromptPair]) -> np.ndarray:
        """(num_pairs,) P(positive) of each (negative, positive) pair for the whole volume."""
        from COLIPRISlicerLib.findings.zero_shot import pair_probabilities

        negatives, positives = self.pair_embeddings(pairs)
        return pair_probabilities(encoding.pooled, negatives, positives, self.temperature)

    def pair_logit_maps(self, encoding: ImageEncoding, pairs: Sequence[TypePromptPair]) -> np.ndarray:
        """(num_pairs, gx, gy, gz) per-patch positive-minus-negative logits (one matrix product)."""
        from COLIPRISlicerLib.findings.zero_shot import pair_logits

        negatives, positives = self.pair_embeddings(pairs)
        return pair_logits(encoding.dense, negatives, positives, self.temperature).numpy()

    def text_similarities(self, encoding: ImageEncoding, texts: Sequence[str]) -> np.ndarray:
        """(N,) cosine similarity of each text to the pooled image embedding (image->text retrieval)."""
        return (self.embed_prompts(texts) @ encoding.pooled).numpy().astype(np.float64)

    def dense_text_similarities(self, encoding: ImageEncoding, texts: Sequence[str]) -> np.ndarray:
        """(N, gx, gy, gz) cosine similarity of each text to every patch embedding."""
        embeddings = self.embed_prompts(texts)
        flat = encoding.dense.reshape(encoding.dense.shape[0], -1)
        return (embeddings @ flat).reshape(len(texts), *encoding.dense.shape[1:]).numpy()
