"""Promises of the repository itself: the README's commands and CI agree."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from conftest import CXR_BERT_VOCAB, REPO, SHARED_CXR_BERT_VOCAB, require


def readme_first_code_block() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```(?:bash)?\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_first_block_has_exactly_two_commands():
    lines = readme_first_code_block()
    assert len(lines) == 2
    assert "colipri-slicer demo" in lines[0] and "pytest" in lines[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert readme_first_code_block()[1] in ci


#: sha256 of CXR-BERT's vocab.txt (microsoft/BiomedVLP-CXR-BERT-specialized, the file in ../shared/data/cxrbert).
CXR_BERT_VOCAB_SHA256 = "311183addf8a52b7de9577b8b2c13b7891766311b7e7649c7242c5ef31a8660e"


def test_the_vocabulary_the_tests_use_is_the_bundled_cxr_bert_one():
    assert CXR_BERT_VOCAB.parent == REPO / "Resources" / "Models" / "phantom"
    assert hashlib.sha256(CXR_BERT_VOCAB.read_bytes()).hexdigest() == CXR_BERT_VOCAB_SHA256


def test_the_bundled_vocabulary_equals_the_shared_cxr_bert_vocabulary():
    assert require(SHARED_CXR_BERT_VOCAB).read_bytes() == CXR_BERT_VOCAB.read_bytes()


def test_the_user_caches_point_into_the_session_temporary_folder(temporary_user_cache):
    from huggingface_hub import constants

    from COLIPRISlicerLib import defaults

    assert defaults.user_cache_dir().is_relative_to(temporary_user_cache)
    assert defaults.embedding_cache_dir().is_relative_to(temporary_user_cache)
    assert Path(constants.HF_HUB_CACHE).is_relative_to(temporary_user_cache)
