"""Slicer-side helpers without a scene: run state machine, settings, device choice, requirements."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from COLIPRISlicerNodes import run_state, runtime

REPO = Path(__file__).resolve().parents[2]


def test_a_run_moves_through_the_states_from_engine_status_lines():
    state = run_state.RunState()
    state.set("installing")
    seen = []
    for message in ("Downloading weights of microsoft/colipri (first use only)", "Loading model", "Encoding",
                    "Preprocessing", "Encoding", "Warning: the crop removed tissue", "Scoring", "Importing results"):
        state.on_status(message)
        seen.append((state.state, state.progress))
    assert [s for s, _ in seen] == ["downloading", "loading", "encoding", "encoding", "encoding", "encoding",
                                     "scoring", "importing"]
    assert [p for _, p in seen] == sorted(p for _, p in seen)
    assert state.detail == "" and state.busy


def test_warnings_become_the_detail_and_cancel_wins():
    state = run_state.RunState("encoding")
    state.on_status("Warning: out of GPU memory; retrying on the CPU")
    assert (state.state, state.detail) == ("encoding", "Warning: out of GPU memory; retrying on the CPU")
    state.on_status("Scoring", cancel_requested=True)
    assert state.state == "cancelling" and state.busy
    state.set("idle", "Cancelled; nothing was added.")
    assert not state.busy and state.progress == 0


def test_unknown_state_is_refused():
    with pytest.raises(ValueError, match='Unknown run state "running"'):
        run_state.RunState().set("running")


def test_settings_round_trip_through_strings():
    settings = SimpleNamespace(modelSource="folder", modelFolder="/models/colipri", device="cpu",
                               precision="bf16", offline=True, diskCache=True, indexFolder="/archive/index")
    stored = runtime.settings_to_strings(settings)
    assert stored == {"modelSource": "folder", "modelFolder": "/models/colipri", "device": "cpu",
                      "precision": "bf16", "offline": "True", "diskCache": "True", "indexFolder": "/archive/index"}
    assert runtime.settings_from_strings(stored) == vars(settings)


def test_stale_or_missing_settings_are_ignored():
    stored = {"modelSource": "cloud", "device": None, "precision": "", "offline": "false", "other": "x"}
    assert runtime.settings_from_strings(stored) == {"offline": False}


def test_model_spec_per_source(tmp_path):
    assert runtime.model_spec("hub") == "microsoft/colipri"
    assert runtime.model_spec("demo") == "demo"
    assert runtime.model_spec("phantom") == "phantom"
    assert (runtime.weights_folder("phantom") / "model.safetensors").is_file()  # bundled in Resources/Models
    assert runtime.model_spec("folder", tmp_path) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="Model folder"):
        runtime.model_spec("folder", Path())
    with pytest.raises(ValueError, match='Unknown model source "cloud"'):
        runtime.model_spec("cloud")


def test_device_choice_falls_back_to_cpu_with_a_reason(monkeypatch):
    import torch

    assert runtime.resolve_device("cpu") == ("cpu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == ("auto", None)
    device, warning = runtime.resolve_device("cuda")
    assert device == "cpu" and "No CUDA GPU" in warning
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1 * 2**30, 8 * 2**30))
    device, warning = runtime.resolve_device("auto")
    assert device == "cpu" and "1.0 GiB of GPU memory is free" in warning
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (20 * 2**30, 24 * 2**30))
    assert runtime.resolve_device("cuda") == ("cuda", None)
    with pytest.raises(ValueError, match='Unknown device "tpu"'):
        runtime.resolve_device("tpu")


def test_offline_mode_reaches_an_imported_huggingface_hub_and_is_undone(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with runtime.offline_mode(True):
        assert constants.is_offline_mode() and runtime.os.environ["HF_HUB_OFFLINE"] == "1"
    assert not constants.is_offline_mode() and "HF_HUB_OFFLINE" not in runtime.os.environ


def test_no_model_folder_is_stored_and_shown_as_empty_not_as_a_dot():
    settings = SimpleNamespace(modelSource="hub", modelFolder="", device="auto", precision="auto",
                               offline=False, diskCache=False, indexFolder=".")
    assert runtime.settings_to_strings(settings)["modelFolder"] == ""
    assert runtime.settings_to_strings(settings)["indexFolder"] == ""
    assert runtime.settings_from_strings({"modelFolder": ".", "indexFolder": "."}) == {}
    assert runtime.weights_folder("folder", Path()) is None
    assert runtime.weights_folder("folder", "/models/colipri") == Path("/models/colipri")


def test_download_folders_are_the_hub_cache_and_our_cache_never_a_model_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("COLIPRISLICER_CACHE", str(tmp_path / "ours"))
    own = tmp_path / "my_model"
    demo = tmp_path / "ours" / "models" / "demo-untrained-v1"
    for folder in (tmp_path / "hub" / "models--microsoft--colipri", own, demo):
        folder.mkdir(parents=True)
    assert runtime.weights_folder("hub") == tmp_path / "hub" / "models--microsoft--colipri"
    assert runtime.weights_folder("folder", own) == own
    removed = runtime.clear_downloads()
    assert sorted(removed) == sorted([tmp_path / "hub" / "models--microsoft--colipri", demo])
    assert own.is_dir() and not demo.exists()


def test_clear_downloads_keeps_what_a_user_put_in_the_cache_folder(monkeypatch, tmp_path):
    from COLIPRISlicerLib.encoding.cache import mark_cache_folder

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("COLIPRISLICER_CACHE", str(tmp_path / "documents"))  # a user's folder
    letter = tmp_path / "documents" / "letter.txt"
    embeddings = tmp_path / "documents" / "embeddings"
    mark_cache_folder(embeddings)
    letter.write_text("mine")
    (embeddings / "scan_notes.txt").write_text("also mine")
    runtime.clear_downloads()
    assert letter.read_text() == "mine" and (embeddings / "scan_notes.txt").read_text() == "also mine"


def test_requirements_have_lower_bounds_and_never_torch_or_simpleitk():
    pytest.importorskip("slicer.util", reason="slicer-core is not installed")
    from COLIPRISlicerNodes import dependencies
    from packaging.requirements import Requirement

    lines = dependencies.read_requirements(REPO / "Resources" / "requirements.txt")
    requirements = [Requirement(line) for line in lines]
    names = {requirement.name.lower() for requirement in requirements}
    assert {"colipri", "transformers", "torchio"} <= names and not names & {"torch", "simpleitk"}
    assert all(any(spec.operator in (">=", "==") for spec in r.specifier) for r in requirements)
    upper = {r.name.lower() for r in requirements if any(s.operator in ("<", "==") for s in r.specifier)}
    assert {"colipri", "transformers"} <= upper
    assert all(dependencies.is_satisfied(str(requirement)) for requirement in requirements)


@pytest.fixture
def dependencies():
    pytest.importorskip("slicer.util", reason="slicer-core is not installed")
    from COLIPRISlicerNodes import dependencies

    return dependencies


@pytest.fixture
def pip_calls(monkeypatch):
    """slicer.util's confirm dialog (answers OK) and pip_install, recording their calls."""
    import slicer.util

    calls = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kwargs: calls.append(text) or True)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: calls.append(("pip_install", args)))
    return calls


def test_slicer_5_10_without_slicer_packaging_installs_with_pip_pinning_torch_torchvision_and_simpleitk(
        dependencies, pip_calls, monkeypatch):
    import slicer_harness

    slicer_harness.without_slicer_packaging(monkeypatch)
    dependencies.ensure_packages(["colipri==0.1.3", "not-a-real-package-xyz>=1"])
    question, (kind, args) = pip_calls
    assert "not-a-real-package-xyz>=1" in question and kind == "pip_install"
    assert args[0] == "-c" and args[2:] == ["not-a-real-package-xyz>=1"]
    pins = Path(args[1]).read_text().split()
    assert {pin.split("==")[0] for pin in pins} == {"torch", "torchvision", "SimpleITK"}


def test_slicer_5_12_installs_with_pip_ensure_skipping_torch_torchvision_and_simpleitk(dependencies, pip_calls,
                                                                                        monkeypatch):
    import slicer_harness

    calls = []
    slicer_harness.with_slicer_packaging(monkeypatch, calls)
    dependencies.ensure_packages(["not-a-real-package-xyz>=1"])
    assert calls == [("pip_ensure", ["not-a-real-package-xyz>=1"],
                      {"skip_packages": ["torch", "torchvision", "SimpleITK"], "requester": "COLIPRISlicer"})]
    assert pip_calls == []


def test_declining_the_installation_says_how_to_be_asked_again(dependencies, monkeypatch):
    import slicer.util
    import slicer_harness

    slicer_harness.without_slicer_packaging(monkeypatch)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: False)
    with pytest.raises(RuntimeError, match="Click Analyze again"):
        dependencies.ensure_packages(["not-a-real-package-xyz>=1"])


def fake_versions(monkeypatch, dependencies, versions: dict, torchvision_requires: list[str]):
    import importlib.metadata

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(dependencies.importlib.metadata, "version", version)
    monkeypatch.setattr(dependencies.importlib.metadata, "requires", lambda name: torchvision_requires)


@pytest.mark.parametrize(("versions", "requires", "problem"), [
    ({"torch": "2.4.1+cu121", "torchvision": "0.19.1+cu121"}, ["torch==2.4.1"], None),
    ({"torch": "2.4.1", "torchvision": "0.29.1"}, ["torch>=2.14.0"], "needs torch>=2.14.0"),
    ({"torch": "2.5.0", "torchvision": "0.19.0"}, [], "expected torchvision 0.20"),
    ({"torch": "2.5.0"}, [], "torchvision is not installed"),
])
def test_torchvision_is_checked_against_the_installed_torch(dependencies, monkeypatch, versions, requires, problem):
    fake_versions(monkeypatch, dependencies, versions, requires)
    found = dependencies.torchvision_problem()
    assert found is None if problem is None else problem in found


def test_a_mismatched_torchvision_is_reinstalled_by_pytorch_utils_not_pip(dependencies, pip_calls, monkeypatch):
    import slicer_harness

    calls = []
    slicer_harness.fake_pytorch_utils(monkeypatch, calls)
    fake_versions(monkeypatch, dependencies, {"torch": "2.5.0", "torchvision": "0.19.0"}, [])
    with pytest.raises(RuntimeError, match="Reinstall PyTorch with the PyTorch Utils module"):
        dependencies.ensure_torch()  # the fake installs nothing, so the mismatch stays
    assert calls == [("installTorch", {"askConfirmation": True, "torchVersionRequirement": ">=2.5,<3"})]
    assert pip_calls == []
