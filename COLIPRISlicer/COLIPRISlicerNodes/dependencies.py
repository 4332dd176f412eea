"""Install what the engine needs, on user action, after asking, on the main thread only.

torch comes from the PyTorch extension (``PyTorchUtils`` installs the build that matches
the GPU driver); everything else from ``Resources/requirements.txt`` through
``slicer.packaging.pip_ensure`` (Slicer >= 5.11), which never touches torch, torchvision
or SimpleITK here. Older Slicer (5.10 has no ``slicer.packaging``): ``slicer.util.pip_install``
with a constraints file that pins the installed torch, torchvision and SimpleITK. timm (a
colipri dependency) needs torchvision; a PyPI torchvision can pull in another torch, so it
is checked against the installed torch and installed together with it by PyTorchUtils.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import tempfile
from pathlib import Path

import slicer

logger = logging.getLogger(__name__)

TORCH_REQUIREMENT = ">=2.5,<3"  # the range of pyproject.toml
SKIP_PACKAGES = ["torch", "torchvision", "SimpleITK"]
#: torchvision 0.(N + 15) is built for torch 2.N.
TORCHVISION_MINOR_OFFSET = 15
REQUESTER = "COLIPRISlicer"


def read_requirements(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def is_satisfied(requirement: str) -> bool:
    from packaging.requirements import Requirement

    parsed = Requirement(requirement)
    try:
        version = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return parsed.specifier.contains(version, prereleases=True)


def missing_requirements(requirements: list[str]) -> list[str]:
    return [requirement for requirement in requirements if not is_satisfied(requirement)]


def torchvision_problem() -> str | None:
    """Why the installed torchvision does not fit the installed torch, or None when it does."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        torch_version = Version(importlib.metadata.version("torch"))
        vision_version = Version(importlib.metadata.version("torchvision"))
    except importlib.metadata.PackageNotFoundError as error:
        return f"{error.name} is not installed"
    for text in importlib.metadata.requires("torchvision") or []:
        requirement = Requirement(text)
        if requirement.name == "torch" and not requirement.specifier.contains(torch_version, prereleases=True):
            return (f"torchvision {vision_version} needs torch{requirement.specifier}"
                    f" but torch {torch_version} is installed")
    expected = (0, torch_version.minor + TORCHVISION_MINOR_OFFSET)
    if torch_version.major == 2 and vision_version.release[:2] != expected:
        return (f"torchvision {vision_version} is not built for torch {torch_version}"
                f" (expected torchvision {expected[0]}.{expected[1]})")
    return None


def ensure_torch() -> None:
    """Install torch and a matching torchvision through the PyTorch extension when missing or mismatched.

    Raises:
        RuntimeError: without the PyTorch extension, when the user declines, or when
            torchvision still does not match torch afterwards.
    """
    torch_ok = is_satisfied("torch" + TORCH_REQUIREMENT)
    problem = torchvision_problem() if torch_ok else f"torch{TORCH_REQUIREMENT} is not installed"
    if problem is None:
        return
    if importlib.util.find_spec("PyTorchUtils") is None:
        message = (f"COLIPRISlicer needs PyTorch ({problem}). Install the \"PyTorch\" extension from the"
                   " Extensions Manager, restart Slicer, then click Analyze again.")
        raise RuntimeError(message)
    import PyTorchUtils

    logic = PyTorchUtils.PyTorchUtilsLogic()
    torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError(f"PyTorch {TORCH_REQUIREMENT} was not installed; COLIPRISlicer cannot run without it.")
    problem = torchvision_problem()
    if problem is not None:
        message = (f"{problem}. Reinstall PyTorch with the PyTorch Utils module (it installs torch and torchvision"
                   " together), restart Slicer, then click Analyze again.")
        raise RuntimeError(message)


def _packaging_module():
    """``slicer.packaging`` (Slicer >= 5.11), or None on older Slicer."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def ensure_packages(requirements: list[str]) -> None:
    """Ask, then pip-install the missing requirements (never torch, torchvision or SimpleITK).

    Raises:
        RuntimeError: when the user declines.
    """
    missing = missing_requirements(requirements)
    if not missing:
        return
    packaging = _packaging_module()
    if packaging is not None:
        packaging.pip_ensure(missing, skip_packages=SKIP_PACKAGES, requester=REQUESTER)
        return
    text = "COLIPRISlicer needs these Python packages:\n" + "\n".join(missing) + "\n\nInstall them now?"
    if not slicer.util.confirmOkCancelDisplay(text, REQUESTER):
        raise RuntimeError("Installation declined; COLIPRISlicer cannot run without these packages. Click Analyze"
                           " again to be asked again.")
    slicer.util.pip_install(["-c", str(_pinning_constraints()), *missing])


def _pinning_constraints() -> Path:
    """A pip constraints file holding the installed torch, torchvision and SimpleITK at their versions."""
    pins = []
    for name in SKIP_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            logger.debug("%s is not installed; nothing to pin.", name)
    path = Path(tempfile.mkdtemp(prefix="colipri-slicer-")) / "constraints.txt"
    path.write_text("\n".join(pins) + "\n", encoding="utf-8")
    return path


def ensure_dependencies(requirements_path: Path) -> None:
    """torch first (its build matters), then the rest. Main thread only."""
    ensure_torch()
    ensure_packages(read_requirements(requirements_path))
