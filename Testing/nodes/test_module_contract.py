"""Static contracts of the Slicer module: .ui names, CMake file lists, import rules.

These read files only (ast, XML, CMake text), except the last test, which imports the
module file in a fresh interpreter with the harness's stubs.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "COLIPRISlicer"
MODULE_FILE = MODULE_DIR / "COLIPRISlicer.py"
PANEL_FILE = MODULE_DIR / "COLIPRISlicerNodes" / "panel.py"
SIMILAR_CASES_PANEL_FILE = MODULE_DIR / "COLIPRISlicerNodes" / "similar_cases_panel.py"
UI_FILE = REPO / "Resources" / "UI" / "COLIPRISlicer.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
#: Third-party packages the Extensions Index allows at file scope of a module file.
ALLOWED_MODULE_IMPORTS = {"slicer", "vtk", "qt", "ctk", "numpy", "SimpleITK"}
#: Resources the built module does not need (README material, placeholders).
UNSHIPPED_RESOURCES = ("Screenshots/", ".gitkeep")


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_object_names() -> set[str]:
    return {element.get("name") for element in ElementTree.parse(UI_FILE).iter() if element.tag in ("widget", "layout")}


def ui_parameter_names() -> set[str]:
    root = ElementTree.parse(UI_FILE).getroot()
    return {prop.findtext("string") for prop in root.iter("property") if prop.get("name") == "SlicerParameterName"}


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.DOTALL)
    if match is None:
        raise AssertionError(f"{variable} not found in CMake text")
    return [item.replace("${MODULE_NAME}", "COLIPRISlicer") for item in match.group(1).split()]


def missing_from_cmake(text: str) -> list[str]:
    """Files the module needs that the module CMakeLists.txt does not list (paths as listed)."""
    scripts = set(cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    resources = set(cmake_list(text, "MODULE_TOP_LEVEL_RESOURCES"))
    needed_scripts = {path.relative_to(MODULE_DIR).as_posix() for path in MODULE_DIR.rglob("*.py")
                      if "__pycache__" not in path.parts and "teaching" not in path.parts}  # the kit stays out
    present = [path.relative_to(REPO).as_posix() for path in (REPO / "Resources").rglob("*") if path.is_file()]
    needed_resources = {path for path in present if not any(part in path for part in UNSHIPPED_RESOURCES)}
    return sorted((needed_scripts - scripts) | (needed_resources - resources))


def file_scope_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """Top-level module names imported by statements that run at import (module and class bodies)."""
    names = []
    bodies = [tree.body] + [node.body for node in tree.body if isinstance(node, ast.ClassDef)]
    for body in bodies:
        for node in body:
            if isinstance(node, ast.Import):
                names += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names.append(("." if node.level else node.module.split(".")[0], node.lineno))
    return names


def test_every_ui_widget_the_module_uses_exists_in_the_ui_file():
    trees = (module_tree(), *(ast.parse(path.read_text(encoding="utf-8")) for path in (PANEL_FILE, SIMILAR_CASES_PANEL_FILE)))
    used = {node.attr for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert len(used) >= 10
    assert used - ui_object_names() == set()


def parameter_fields(class_name: str) -> dict[str, str]:
    classes = {node.name: node for node in module_tree().body if isinstance(node, ast.ClassDef)}
    return {item.target.id: ast.unparse(item.annotation) for item in classes[class_name].body
            if isinstance(item, ast.AnnAssign)}


#: Path fields the panel binds itself (Slicer's Path connector shows an empty path as ".").
BOUND_BY_THE_PANEL = {"headFolder", "settings.modelFolder", "settings.indexFolder"}


def test_every_parameter_is_bound_to_exactly_the_widgets_in_the_ui():
    fields = parameter_fields("COLIPRISlicerParameterNode")
    expected = {name for name, kind in fields.items() if kind != "COLIPRISlicerSettings"}
    pack = next(name for name, kind in fields.items() if kind == "COLIPRISlicerSettings")
    expected |= {f"{pack}.{name}" for name in parameter_fields("COLIPRISlicerSettings")}
    assert ui_parameter_names() == expected - BOUND_BY_THE_PANEL
    panel = PANEL_FILE.read_text(encoding="utf-8")
    assert all(f'"{name.rpartition(".")[2]}")' in panel for name in BOUND_BY_THE_PANEL)


def test_module_cmake_lists_every_file_the_module_needs():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert missing_from_cmake(text) == []
    listed = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    assert [item for item in listed if not (MODULE_DIR / item).is_file()] == []
    resources = cmake_list(text, "MODULE_TOP_LEVEL_RESOURCES")
    assert [item for item in resources if not (REPO / item).is_file()] == []


def test_cmake_check_reports_a_file_that_is_not_listed():
    listed = MODULE_CMAKE.read_text(encoding="utf-8")
    text = listed.replace("  COLIPRISlicerLib/slicer_worker.py\n", "").replace("  Resources/UI/COLIPRISlicer.ui\n", "")
    newly_missing = sorted(set(missing_from_cmake(text)) - set(missing_from_cmake(listed)))
    assert newly_missing == ["COLIPRISlicerLib/slicer_worker.py", "Resources/UI/COLIPRISlicer.ui"]


def test_resources_the_module_loads_are_shipped():
    text = MODULE_FILE.read_text(encoding="utf-8") + PANEL_FILE.read_text(encoding="utf-8")
    loaded = set(re.findall(r'(?:resourcePath|resource_path)\("([^"]+)"\)', text))
    assert loaded == {"UI/COLIPRISlicer.ui", "requirements.txt"}
    resources = set(cmake_list(MODULE_CMAKE.read_text(encoding="utf-8"), "MODULE_TOP_LEVEL_RESOURCES"))
    assert {f"Resources/{name}" for name in loaded} <= resources
    assert "Resources/Icons/COLIPRISlicer.png" in resources


def test_module_file_imports_only_stdlib_and_slicer_packages_at_file_scope():
    # COLIPRISlicerNodes is the module's own Slicer-side package (itself checked below)
    allowed = ALLOWED_MODULE_IMPORTS | set(sys.stdlib_module_names) | {"COLIPRISlicerNodes"}
    offending = [(name, line) for name, line in file_scope_imports(module_tree()) if name not in allowed]
    assert offending == []


def test_module_file_runs_nothing_at_import():
    tree = module_tree()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)):
            continue
        assert isinstance(node, ast.Assign), f"line {node.lineno}: only constants may be set at file scope"
        ast.literal_eval(node.value)


@pytest.mark.parametrize("path", sorted((MODULE_DIR / "COLIPRISlicerNodes").glob("*.py")), ids=lambda p: p.name)
def test_slicer_side_helpers_import_nothing_heavy_at_file_scope(path):
    allowed = ALLOWED_MODULE_IMPORTS | set(sys.stdlib_module_names) | {".", "COLIPRISlicerLib"}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert [(name, line) for name, line in file_scope_imports(tree) if name not in allowed] == []


@pytest.mark.parametrize("path", sorted((MODULE_DIR / "COLIPRISlicerLib").rglob("*.py")), ids=lambda p: p.name)
def test_engine_never_imports_slicer_qt_or_vtk(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert imported & {"slicer", "qt", "ctk", "vtk", "vtkmodules"} == set()


def test_the_slicer_build_ships_no_teaching_kit_and_nothing_it_ships_needs_it():
    listed = cmake_list((MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8"), "MODULE_PYTHON_SCRIPTS")
    assert not [path for path in listed if "teaching" in path]
    assert len(list((MODULE_DIR / "COLIPRISlicerLib" / "teaching").glob("*.py"))) >= 10
    for path in listed:  # the command line's teaching commands (cli/) are not run inside Slicer
        if path.endswith(".py") and not path.startswith("COLIPRISlicerLib/cli/"):
            tree = ast.parse((MODULE_DIR / path).read_text(encoding="utf-8"))
            modules = {(node.level, node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert not [module for _, module in modules if module.split(".")[0] == "teaching"
                        or module.startswith("COLIPRISlicerLib.teaching")], path


def test_importing_the_module_loads_no_torch_and_starts_no_thread():
    pytest.importorskip("slicer.util", reason="slicer-core is not installed")
    code = (
        "import sys, threading; sys.path[:0] = ['Testing', 'COLIPRISlicer']\n"
        "import slicer_harness; slicer_harness.install_module_stubs()\n"
        "import COLIPRISlicer\n"
        "heavy = sorted(m for m in ('torch', 'colipri', 'transformers', 'torchio', 'monai') if m in sys.modules)\n"
        "print(heavy, threading.active_count())\n"
    )
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert output.strip().splitlines()[-1] == "[] 1"


def cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\({variable}\s+"([^"]*)"\)', text)
    if match is None:
        raise AssertionError(f"{variable} not found in CMake text")
    return match.group(1)


def test_repository_name_and_urls_agree_in_cmake_catalog_entry_s4ext_readme_and_module():
    import json

    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    catalog = json.loads((REPO / "COLIPRISlicer.json").read_text(encoding="utf-8"))
    s4ext = dict(line.split(" ", 1) for line in (REPO / "COLIPRISlicer.s4ext").read_text().splitlines()
                 if line and not line.startswith("#") and " " in line)
    repository = catalog["scm_url"].removesuffix(".git")
    name = repository.rsplit("/", 1)[-1]
    assert name.startswith("Slicer") and name != "SlicerCOLIPRISlicer"  # Extensions Index: check_git_repository_name
    assert re.search(r"project\(COLIPRISlicer\)", cmake)  # the extension keeps its name
    assert s4ext["scmurl"] == catalog["scm_url"] and s4ext["homepage"] == cmake_value(cmake, "EXTENSION_HOMEPAGE")
    assert cmake_value(cmake, "EXTENSION_HOMEPAGE") == f"{repository}#readme"
    assert f'DOCUMENTATION_URL = "{repository}#readme"' in MODULE_FILE.read_text(encoding="utf-8")
    assert repository in (REPO / "README.md").read_text(encoding="utf-8")
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    images = [cmake_value(cmake, "EXTENSION_ICONURL"), *cmake_value(cmake, "EXTENSION_SCREENSHOTURLS").split()]
    assert [s4ext["iconurl"], *s4ext["screenshoturls"].split()] == images
    for url in images:  # resolve once pushed: each names a file of this repository on main
        assert url.startswith(raw) and (REPO / url.removeprefix(raw)).is_file(), url
