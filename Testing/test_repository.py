"""Promises of the repository itself: the README's commands and CI agree, the tests' vocabulary and
caches, and the dependencies declared for what the code imports."""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import tomllib
from pathlib import Path

from conftest import CXR_BERT_VOCAB, REPO, SHARED_CXR_BERT_VOCAB, require
from packaging.requirements import Requirement


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


#: Import names whose distribution is spelled otherwise (compared after PEP 503 normalisation).
DISTRIBUTION_OF_IMPORT = {"yaml": "pyyaml", "hydra": "hydra-core", "sklearn": "scikit-learn", "PIL": "pillow",
                          "faiss": "faiss-cpu"}
#: Modules Slicer itself provides; the module file and the panel import them, the engine never does.
SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "PyTorchUtils", "DICOMLib"}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports(*packages: Path) -> dict[str, str]:
    """Top-level third-party module -> one file importing it, over every module of ``packages``."""
    files = sorted(file for package in packages for file in package.rglob("*.py"))
    return _third_party_imports_of(files, own={package.name for package in packages})


def _third_party_imports_of(files: list[Path], own: set[str]) -> dict[str, str]:
    """Top-level third-party module -> the first of ``files`` importing it (any depth, deferred too)."""
    imports = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imports.setdefault(name.split(".")[0], path.relative_to(REPO).as_posix())
    return {name: where for name, where in imports.items() if name not in sys.stdlib_module_names | own}


def _declared(requirements: list[str]) -> dict[str, Requirement]:
    return {_normalised(requirement.name): requirement for requirement in map(Requirement, requirements)}


def test_every_third_party_import_of_the_engine_and_the_panel_is_declared_with_a_lower_bound():
    table = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [line for name, lines in table["optional-dependencies"].items() if name != "test" for line in lines]
    project = _declared(table["dependencies"] + extras)  # an extra's import (ray: cluster) says what to install
    module = REPO / "COLIPRISlicer"
    imports = _third_party_imports(module / "COLIPRISlicerLib", module / "COLIPRISlicerNodes")
    assert {"torch", "colipri", "accelerate", "hydra", "omegaconf", "einops", "slicer"} <= set(imports)
    undeclared = {name: where for name, where in imports.items() if name not in SLICER_MODULES
                  and _normalised(DISTRIBUTION_OF_IMPORT.get(name, name)) not in project}
    assert undeclared == {}, "declare these in pyproject.toml (import name: first file importing it)"
    assert [name for name, r in project.items() if not any(s.operator in (">=", "==") for s in r.specifier)] == []


def test_requirements_txt_asks_for_the_same_ranges_as_pyproject():
    project, slicer = _pyproject_dependencies(), _slicer_requirements()
    assert {"colipri", "transformers", "pyarrow"} <= set(slicer)
    assert set(slicer) <= set(project), "every package Slicer installs is a dependency of the engine"
    assert {name: str(r.specifier) for name, r in slicer.items()} == {
        name: str(project[name].specifier) for name in slicer}


def _pyproject_dependencies() -> dict[str, Requirement]:
    return _declared(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"])


def _slicer_requirements() -> dict[str, Requirement]:
    """What the module installs into Slicer (``Resources/requirements.txt``, comments dropped)."""
    lines = (line.split("#")[0].strip() for line in (REPO / "Resources" / "requirements.txt").read_text().splitlines())
    return _declared([line for line in lines if line])


def test_the_slicer_installers_torch_range_is_pyprojects():
    """``dependencies.TORCH_REQUIREMENT`` (what the PyTorch extension is asked for) = pyproject's torch range."""
    source = REPO / "COLIPRISlicer" / "COLIPRISlicerNodes" / "dependencies.py"
    assigned = {target.id: node.value for node in ast.parse(source.read_text(encoding="utf-8")).body
                if isinstance(node, ast.Assign) for target in node.targets if isinstance(target, ast.Name)}
    asked = Requirement("torch" + ast.literal_eval(assigned["TORCH_REQUIREMENT"])).specifier
    assert asked == _pyproject_dependencies()["torch"].specifier, "set TORCH_REQUIREMENT to pyproject.toml's torch range"


#: Packages Slicer's own Python ships (python-packaging, pydicom, numpy, SimpleITK), and torch with
#: torchvision, which come from the PyTorch extension: requirements.txt never asks pip for them.
SLICER_PROVIDED = {"numpy", "SimpleITK", "pydicom", "packaging", "torch", "torchvision"}
#: Optional in Slicer too (an extra, imported only after a check): faiss -- search falls back to exact numpy.
SLICER_OPTIONAL = {"faiss"}


def _modules_the_slicer_module_loads() -> list[Path]:
    """The module file, COLIPRISlicerNodes, and every engine module they reach (imports at any depth)."""
    module = REPO / "COLIPRISlicer"
    graph, lib = _engine_import_graph(), module / "COLIPRISlicerLib"
    entry = [module / "COLIPRISlicer.py", *sorted((module / "COLIPRISlicerNodes").glob("*.py"))]
    todo = set()
    for path in entry:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "COLIPRISlicerLib":
                base = node.module.removeprefix("COLIPRISlicerLib").removeprefix(".")
                todo |= {f"{base}.{alias.name}".lstrip(".") if f"{base}.{alias.name}".lstrip(".") in graph else base
                         for alias in node.names}
    reached = set()
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo |= graph.get(name, set())
    files = [lib.joinpath(*name.split(".")).with_suffix(".py") for name in reached if name]
    files = [path if path.is_file() else path.with_suffix("") / "__init__.py" for path in files]
    return entry + sorted(files + [lib / "__init__.py"])


def test_every_package_the_slicer_module_imports_is_installed_by_requirements_txt():
    files = _modules_the_slicer_module_loads()
    names = {path.relative_to(REPO / "COLIPRISlicer").as_posix() for path in files}
    assert {"COLIPRISlicerLib/retrieval/index.py", "COLIPRISlicerLib/encoding/engine.py"} <= names
    assert "COLIPRISlicerLib/cli.py" not in names and not any("/teaching/" in name for name in names)
    imports = _third_party_imports_of(files, own={"COLIPRISlicerLib", "COLIPRISlicerNodes", "COLIPRISlicer"})
    assert {"pyarrow", "torch", "slicer", "colipri"} <= set(imports)
    slicer = _slicer_requirements()
    missing = {name: where for name, where in imports.items() if name not in SLICER_MODULES | SLICER_PROVIDED | SLICER_OPTIONAL
               and _normalised(DISTRIBUTION_OF_IMPORT.get(name, name)) not in slicer}
    assert missing == {}, "add these to Resources/requirements.txt (import name: first file importing it)"


def _engine_import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any depth (in functions and TYPE_CHECKING blocks too),
    relative or absolute (``from COLIPRISlicerLib.x import y`` names module ``x.y`` when that is a module)."""
    root = REPO / "COLIPRISlicer" / "COLIPRISlicerLib"
    names = {".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")}
    modules = {name.removesuffix(".__init__").removesuffix("__init__") for name in names}
    graph = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]
        me = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])])
            elif (node.module or "").split(".")[0] == "COLIPRISlicerLib":
                base = node.module.removeprefix("COLIPRISlicerLib").removeprefix(".")
            else:
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}".lstrip(".")
                targets.add(child if child in modules else base)
        graph[me] = targets - {me}
    return graph


def test_the_engine_has_no_import_cycle_deferred_or_not():
    graph = _engine_import_graph()
    assert {"geometry", "io.volume", "segmentation.head", "segmentation.files", "teaching.stream"} <= set(graph)
    assert "io.volume" in graph["geometry"] or "geometry" in graph["io.volume"]
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif len(path) < 12:
                visit(target, path + [target])

    for module in sorted(graph):
        visit(module, [module])
    assert cycles == []
