"""The text side of a model config: a plain ``transformers.BertModel`` backbone and ``BertTokenizer``.

COLIPRI's text encoder is CXR-BERT; it is built from CXR-BERT's ``config.json`` without remote code
(:func:`colipri_config`). Small models (:mod:`.folder`) use the same backbone and tokenizer entries
with their own sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from COLIPRISlicerLib import defaults

#: The ``BertConfig`` settings taken from CXR-BERT's ``config.json``.
BERT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "position_embedding_type",
)


def bert_backbone_config(bert_settings: dict) -> dict:
    """Hydra config of a ``transformers.BertModel`` without pooling layer, from ``BertConfig`` settings."""
    return {
        "_target_": "transformers.BertModel",
        "add_pooling_layer": False,
        "config": {"_target_": "transformers.BertConfig", **bert_settings},
    }


def bert_tokenizer_config(vocab_path: str) -> dict:
    """Hydra config of a lower-casing ``transformers.BertTokenizer`` reading ``vocab_path``."""
    return {"_target_": "transformers.BertTokenizer", "vocab": vocab_path,
            "do_lower_case": True, "model_max_length": defaults.MAX_PROMPT_TOKENS}


def colipri_config(bert_config_path: Path, vocab_path: Path) -> dict:
    """colipri's packaged config with a plain BertModel text backbone and BertTokenizer.

    Args:
        bert_config_path: CXR-BERT's ``config.json``.
        vocab_path: CXR-BERT's ``vocab.txt``.

    Returns:
        ``{"model": ..., "processor": ...}``, fully resolved.
    """
    from colipri.checkpoint import load_model_config, load_processor_config
    from omegaconf import OmegaConf

    bert = json.loads(Path(bert_config_path).read_text())
    model = OmegaConf.to_container(load_model_config(), resolve=True)
    processor = OmegaConf.to_container(load_processor_config(), resolve=True)
    model["text_encoder"]["backbone"] = bert_backbone_config({k: bert[k] for k in BERT_CONFIG_KEYS if k in bert})
    processor["tokenizer"] = bert_tokenizer_config(str(vocab_path))
    return {"model": model, "processor": processor}
