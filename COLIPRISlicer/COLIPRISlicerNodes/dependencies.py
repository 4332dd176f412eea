"""Install what the engine needs, on user action, after asking, on the main thread only.

torch comes from the PyTorch extension (``PyTorchUtils`` installs the build that matches
the GPU driver); everything else from ``Resources/requirements.txt`` through
``slicer.packaging.pip_ensure`` (Slicer >= 5.11), which never touches torch or SimpleITK
here. Older Slicer: ``slicer.util.pip_install`` with a constraints file that pins the
installed torch and SimpleITK.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TORCH_REQUIREMENT = ">=2.4,<3"
SKIP_PACKAGES = ["torch", "SimpleITK"]
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


def ensure_torch() -> None:
    """Install torch through the PyTorch extension if it is missing or out of range.

    Raises:
        RuntimeError: without the PyTorch extension, or when the user declines.
    """
    if is_satisfied("torch" + TORCH_REQUIREMENT):
        return
    if importlib.util.find_spec("PyTorchUtils") is None:
        message = ('COLIPRISlicer needs PyTorch. Install the "PyTorch" extension from the Extensions Manager,'
                   " restart Slicer, then click Analyze again.")
        raise RuntimeError(message)
    import PyTorchUtils

    logic = PyTorchUtils.PyTorchUtilsLogic()
    torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError(f"PyTorch {TORCH_REQUIREMENT} was not installed; COLIPRISlicer cannot run without it.")


def ensure_packages(requirements: list[str]) -> None:
    """Ask, then pip-install the missing requirements (never torch or SimpleITK).

    Raises:
        RuntimeError: when the user declines.
    """
    missing = missing_requirements(requirements)
    if not missing:
        return
    if importlib.util.find_spec("slicer.packaging") is not None:
        import slicer.packaging

        slicer.packaging.pip_ensure(missing, skip_packages=SKIP_PACKAGES, requester=REQUESTER)
        return
    text = "COLIPRISlicer needs these Python packages:\n" + "\n".join(missing) + "\n\nInstall them now?"
    if not slicer.util.confirmOkCancelDisplay(text, REQUESTER):
        raise RuntimeError("Installation declined; COLIPRISlicer cannot run without these packages.")
    slicer.util.pip_install(["-c", str(_pinning_constraints()), *missing])


def _pinning_constraints() -> Path:
    """A pip constraints file holding the installed torch and SimpleITK at their versions."""
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
