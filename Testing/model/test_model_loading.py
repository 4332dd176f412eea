"""Model specs, devices, precision, and the errors users see when something is off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO, RAS_NIFTI, require

from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.io.volume import load_volume

PAIRS = [("No pleural effusion present", "Pleural effusion present")]


def copy_model(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


def test_identity_records_sha256_and_config_metadata(tiny_engine, tiny_model_folder):
    import hashlib

    expected = hashlib.sha256((tiny_model_folder / "model.safetensors").read_bytes()).hexdigest()
    identity = tiny_engine.identity
    assert identity.sha256 == expected
    assert identity.model_id == "tests/tiny-random"
    assert (identity.source, identity.device, identity.dtype) == ("folder", "cpu", "fp32")


def test_temperature_comes_from_the_checkpoint(tiny_model_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model(tiny_model_folder, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["softmax_temperature"] = state["softmax_temperature"] * 0 + 0.07
    save_file(state, str(folder / "model.safetensors"))
    assert Engine(str(folder), device="cpu").temperature == pytest.approx(0.07)


def test_folder_without_weights_says_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        Engine(str(tmp_path), device="cpu").loaded


def test_corrupt_weights_are_reported(tiny_model_folder, tmp_path):
    folder = copy_model(tiny_model_folder, tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(RuntimeError, match="corrupt or incomplete"):
        Engine(str(folder), device="cpu").loaded


def test_weights_of_another_architecture_are_refused(tiny_model_folder, tmp_path):
    folder = copy_model(tiny_model_folder, tmp_path)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model"]["text_encoder"]["backbone"]["config"]["num_hidden_layers"] = 1
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match="does not match the model architecture"):
        Engine(str(folder), device="cpu").loaded


def test_config_without_model_section_is_refused(tiny_model_folder, tmp_path):
    folder = copy_model(tiny_model_folder, tmp_path)
    (folder / "config.yaml").write_text(yaml.safe_dump({"processor": {}}))
    with pytest.raises(ValueError, match=r"lacks the top-level section\(s\) \['model'\]"):
        Engine(str(folder), device="cpu").loaded


def test_unknown_spec_is_explained():
    with pytest.raises(FileNotFoundError, match="neither an existing model folder"):
        Engine("./no/such/folder", device="cpu").loaded


def test_offline_hub_without_cache_names_the_model_folder_option(tmp_path):
    code = "from COLIPRISlicerLib.encoding.engine import Engine; Engine('microsoft/colipri', device='cpu').loaded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "COLIPRISLICER_CACHE": str(tmp_path),
           "PYTHONPATH": str(REPO / "COLIPRISlicer")}
    completed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "Offline? Either pass a model folder" in completed.stderr
    assert "hf download microsoft/colipri model.safetensors" in completed.stderr


def test_cuda_request_without_cuda_is_explained():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        Engine("demo", device="cuda").loaded


def test_unknown_precision_is_rejected(tiny_model_folder):
    with pytest.raises(ValueError, match='Unknown precision "fp8"'):
        Engine(str(tiny_model_folder), device="cpu", precision="fp8").loaded


def test_out_of_memory_retries_on_cpu_with_a_warning(tiny_model_folder, monkeypatch):
    import torch

    import COLIPRISlicerLib.encoding.engine as engine_module

    engine = Engine(str(tiny_model_folder), device="cpu", precision="fp32")
    real = engine_module.run_image_encoder
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "run_image_encoder", fail_once)
    with pytest.warns(RuntimeWarning, match="Out of GPU memory .* retrying on the CPU"):
        encoding = engine.encode(load_volume(require(RAS_NIFTI)))
    assert len(calls) == 2 and engine.identity.device == "cpu"
    assert encoding.pooled.shape == (32,)


def test_bf16_likelihoods_within_0_01_of_fp32(tiny_model_folder, tiny_engine):
    volume = load_volume(require(RAS_NIFTI))
    bf16 = Engine(str(tiny_model_folder), device="cpu", precision="bf16")
    assert bf16.identity.dtype == "bf16"
    fp32_p = tiny_engine.pair_probabilities(tiny_engine.encode(volume), PAIRS)
    bf16_p = bf16.pair_probabilities(bf16.encode(volume), PAIRS)
    assert np.abs(fp32_p - bf16_p).max() < 0.01
    assert bf16.encode(volume).key != tiny_engine.encode(volume).key


def test_out_of_memory_is_caught_where_torch_has_no_top_level_out_of_memory_error(tiny_model_folder, monkeypatch):
    """torch 2.4 has only ``torch.cuda.OutOfMemoryError``; there ``except torch.OutOfMemoryError`` fails."""
    import torch

    import COLIPRISlicerLib.encoding.engine as engine_module

    cuda_error = torch.cuda.OutOfMemoryError
    monkeypatch.delattr(torch, "OutOfMemoryError")
    engine = Engine(str(tiny_model_folder), device="cpu", precision="fp32")
    real, calls = engine_module.run_image_encoder, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise cuda_error("CUDA out of memory (simulated, torch 2.4)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "run_image_encoder", fail_once)
    with pytest.warns(RuntimeWarning, match="retrying on the CPU"):
        encoding = engine.encode(load_volume(require(RAS_NIFTI)))
    assert len(calls) == 2 and encoding.pooled.shape == (32,)


def test_auto_precision_on_a_cpu_without_torch_private_probes_is_fp32(monkeypatch):
    import torch

    from COLIPRISlicerLib.model.devices import select_precision

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert select_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert select_precision("auto", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("name", ["foo", "gpu", "cuda:x", ""])
def test_unknown_device_names_are_refused_with_the_accepted_ones(name):
    from COLIPRISlicerLib.model.devices import select_device

    with pytest.raises(ValueError, match=f'Unknown device "{name}"; use "auto", "cpu", "cuda", "cuda:N" or "mps"'):
        select_device(name)


def test_missing_colipri_private_config_loader_names_the_version_to_install(monkeypatch):
    import colipri.checkpoint

    from COLIPRISlicerLib.model.folder import colipri_config_loader

    assert colipri_config_loader() is colipri.checkpoint._load_config
    monkeypatch.delattr(colipri.checkpoint, "_load_config")
    with pytest.raises(RuntimeError, match=r"has no checkpoint._load_config, .* install colipri==0.1.3"):
        colipri_config_loader()


def test_torch_floor_has_the_apis_the_engine_uses():
    """``torch.OutOfMemoryError`` exists from torch 2.5: the declared floor must not be lower."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(text) for text in project["dependencies"] if Requirement(text).name == "torch")
    assert not torch.specifier.contains("2.4.1") and torch.specifier.contains("2.5.0")


def test_model_given_as_its_weights_file_names_the_folder(tiny_model_folder):
    weights = tiny_model_folder / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=f'Model "{weights}" is a file; .* pass "{tiny_model_folder}"'):
        Engine(str(weights), device="cpu").description
