"""A real MRML scene from ``slicer-core`` for testing the module's Logic without the Slicer app.

Real: the scene, ``vtkSlicerApplicationLogic``, the Colors, Volumes, Segmentations, Markups,
Tables, Texts, SubjectHierarchy and Plots module logics (reachable as
``slicer.modules.<name>.logic()``), the Red/Yellow/Green slice and slice-composite nodes
(made by ``vtkMRMLLayoutLogic`` + ``vtkMRMLSliceLogic``) and ``slicer.util``.

Stand-ins, because ``slicer-core`` lacks them, each behaving like Slicer where the module
depends on it: the module base classes (``slicer.ScriptedLoadableModule``: icon looked
up beside the module file only; singleton parameter node), ``slicer.parameterNodeWrapper``
(values stored on the MRML node, so Close Scene, which resets the singleton node, resets
them), ``qt`` (QSettings, QIcon, table items), ``slicer.i18n``; for the panel
(:class:`PanelHarness`): ``slicer.app`` whose ``processEvents`` runs scheduled user
actions (clicks, Close Scene, module switch, quit) and counts nesting, has no layout manager
(as without a main window) and a core IO manager that loads volume files as Add Data does (for
``slicer.util.loadVolume``), and the .ui widgets with their signals, slots called as PythonQt
calls them. Slicer's DICOM database and ``DICOMLib`` are in ``slicer_dicom_harness``. Slicer versions: ``slicer.packaging``
absent (5.10) or present (5.12), and the PyTorch extension's ``PyTorchUtils``. Without a
:class:`PanelHarness` there is no ``slicer.app`` and the Logic's ``processEvents`` does nothing.

Also: loading volumes the way Slicer does (``AddArchetypeVolume``) and an offscreen VTK
rendering of an axial slice with the CT, a colour-mapped heatmap and segment outlines in
separate render layers.
"""

from __future__ import annotations

import os
import sys
import traceback
import types
import typing
import unittest
from pathlib import Path

import numpy as np

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer
import vtk
import vtk.util.numpy_support

MODULE_LOGICS = {
    "colors": ("Colors", "vtkSlicerColorLogic"),
    "volumes": ("Volumes", "vtkSlicerVolumesLogic"),
    "segmentations": ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    "markups": ("Markups", "vtkSlicerMarkupsLogic"),
    "tables": ("Tables", "vtkSlicerTablesLogic"),
    "texts": ("Texts", "vtkSlicerTextsLogic"),
    "subjecthierarchy": ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    "plots": ("Plots", "vtkSlicerPlotsLogic"),
}
SLICE_VIEWS = ("Red", "Yellow", "Green")
STUBBED_MODULES = ("qt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n")


# --- stubs -------------------------------------------------------------------------------


class _ScriptedLoadableModule:
    """As Slicer's: the icon is looked for only in ``Resources/Icons`` beside the module file."""

    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__
        icon = Path(parent.path).parent / "Resources" / "Icons" / f"{self.moduleName}.png"
        if icon.is_file():
            parent.icon = _QIcon(str(icon))


class _ScriptedLoadableModuleWidget:
    """As Slicer's: a parent (with ``isEntered``) and its layout; ``setup`` adds nothing here."""

    def __init__(self, parent=None):
        self.parent = parent if parent is not None else types.SimpleNamespace(isEntered=True)
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.layout = types.SimpleNamespace(widgets=[], addWidget=lambda widget: self.layout.widgets.append(widget))

    def setup(self):
        pass


class _ScriptedLoadableModuleLogic:
    """As Slicer's: one singleton ``vtkMRMLScriptedModuleNode`` per module as parameter node."""

    def __init__(self, parent=None):
        super().__init__()  # as Slicer's, so a mixed-in base is initialised with its defaults first
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            slicer.mrmlScene.AddNode(node)
        return node


class _ScriptedLoadableModuleTest(unittest.TestCase):
    """As Slicer's: a ``unittest.TestCase`` (so ``SkipTest`` reports a skip) with ``delayDisplay``."""

    def delayDisplay(self, message, msec=None):
        print(message)


def _value_type(annotation):
    """``Annotated[str, Choice(...)]`` -> ``str``."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def _parameter_node_wrapper(cls):
    """As Slicer's ``parameterNodeWrapper``/``parameterPack``: typed attributes stored *on the
    MRML node* (parameters as strings, nodes as references, packs under ``name.``), missing
    ones written with the class defaults. So ``vtkMRMLScene::Clear``, which resets the
    singleton parameter node, resets every value, as in Slicer."""
    fields = {name: _value_type(kind) for name, kind in cls.__dict__.get("__annotations__", {}).items()}
    defaults = {name: getattr(cls, name, None) for name in fields}

    class Wrapper:
        _isPack = True

        def __init__(self, parameterNode, prefix=""):
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_prefix", prefix)
            present = set(parameterNode.GetParameterNames())
            for name, kind in fields.items():
                if not getattr(kind, "_isPack", False) and not _is_node_type(kind) and prefix + name not in present:
                    setattr(self, name, defaults[name])

        def __getattr__(self, name):
            if name not in fields:  # AddObserver, RemoveObserver, ...: the MRML node's
                return getattr(self.parameterNode, name)
            kind, key = fields[name], self._prefix + name
            if getattr(kind, "_isPack", False):
                return kind(self.parameterNode, key + ".")
            if _is_node_type(kind):
                return self.parameterNode.GetNodeReference(key)
            if key not in self.parameterNode.GetParameterNames():
                return defaults[name]
            text = self.parameterNode.GetParameter(key)
            return text == "True" if kind is bool else kind(text)

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            key = self._prefix + name
            if _is_node_type(fields[name]):
                self.parameterNode.SetNodeReferenceID(key, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(key, str(value))

        def connectGui(self, ui):
            """As Slicer's connectors: each .ui widget with a SlicerParameterName shows its value
            (a path field the text ``str(value)``), now and after every change of the node."""
            bound = [widget for widget in vars(ui).values() if getattr(widget, "parameterName", None)]

            def show(caller=None, event=None):
                for widget in bound:
                    value = self
                    for part in widget.parameterName.split("."):
                        value = getattr(value, part)
                    widget.show(value)

            show()
            return ("gui", self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, show))

        def disconnectGui(self, tag):
            assert tag is not None and tag[0] == "gui", "disconnectGui needs the tag connectGui returned"
            self.parameterNode.RemoveObserver(tag[1])

    Wrapper.__name__ = Wrapper.__qualname__ = cls.__name__
    Wrapper.__doc__ = cls.__doc__
    return Wrapper


def _is_node_type(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)


class _Validator:
    def __init__(self, *args, **kwargs):
        self.args = args


class _QIcon:
    def __init__(self, path: str = ""):
        self.path = path

    def isNull(self) -> bool:
        return not self.path


class _QSettings:
    """QSettings backed by one dict per test session (``STORE``), as persistent as the real one."""

    STORE: dict = {}

    def value(self, key, default=None):
        return self.STORE.get(key, default)

    def setValue(self, key, value):
        self.STORE[key] = value


class _QTableWidgetItem:
    def __init__(self, text: str = ""):
        self._text = text

    def text(self) -> str:
        return self._text


def _qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QIcon, qt.QSettings, qt.QTableWidgetItem = _QIcon, _QSettings, _QTableWidgetItem
    qt.Qt = types.SimpleNamespace(WaitCursor=3)
    qt.QUrl = types.SimpleNamespace(fromLocalFile=lambda path: path)
    qt.QDesktopServices = types.SimpleNamespace(opened=[])
    qt.QDesktopServices.openUrl = qt.QDesktopServices.opened.append
    return qt


def _stub_modules() -> dict[str, types.ModuleType]:
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    base.ScriptedLoadableModule = _ScriptedLoadableModule
    base.ScriptedLoadableModuleWidget = _ScriptedLoadableModuleWidget
    base.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    base.ScriptedLoadableModuleTest = _ScriptedLoadableModuleTest
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = wrapper.parameterPack = _parameter_node_wrapper
    wrapper.Choice = wrapper.WithinRange = _Validator
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"qt": _qt_module(), "slicer.ScriptedLoadableModule": base,
            "slicer.parameterNodeWrapper": wrapper, "slicer.i18n": i18n}


def install_module_stubs() -> dict:
    """Put the stubs into ``sys.modules``; returns what they replaced (for :func:`remove_module_stubs`)."""
    saved = {name: sys.modules.get(name) for name in STUBBED_MODULES}
    for name, module in _stub_modules().items():
        sys.modules[name] = module
        if name.startswith("slicer."):
            setattr(slicer, name.split(".", 1)[1], module)
    return saved


def remove_module_stubs(saved: dict) -> None:
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
            if name.startswith("slicer.") and hasattr(slicer, name.split(".", 1)[1]):
                delattr(slicer, name.split(".", 1)[1])
        else:
            sys.modules[name] = module


# --- application and panel ---------------------------------------------------------------


class FakeApplication:
    """``slicer.app`` for the Widget: ``processEvents`` runs the user's actions scheduled with
    :meth:`when` (a click, Close Scene, quit) and counts how deeply it is nested (a wait
    inside a wait shows as depth 2). Testing mode, as in Slicer's self-tests."""

    def __init__(self):
        self.process_events_calls = 0
        self.depth = self.max_depth = 0
        self.slot_errors: list[BaseException] = []
        self._scheduled: list = []

    def when(self, predicate, action) -> None:
        """Run ``action`` once, in the first ``processEvents`` call where ``predicate()`` holds."""
        self._scheduled.append((predicate, action))

    @property
    def scheduled(self) -> int:
        return len(self._scheduled)

    def processEvents(self) -> None:
        self.process_events_calls += 1
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        try:
            for entry in list(self._scheduled):
                if entry in self._scheduled and entry[0]():
                    self._scheduled.remove(entry)
                    entry[1]()
        finally:
            self.depth -= 1

    def testingEnabled(self) -> bool:
        return True

    def layoutManager(self):
        """None, as in Slicer started without a main window (no slice widgets to fit)."""
        return None

    def coreIOManager(self) -> CoreIOManager:
        return CoreIOManager()

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass


class CoreIOManager:
    """``slicer.app.coreIOManager()`` for ``slicer.util.loadVolume``: a "VolumeFile" is loaded as
    Slicer's volume reader loads it (``AddArchetypeVolume``, named after the file unless
    ``properties["name"]``); a file it cannot read makes ``loadNodes`` return False."""

    def fileType(self, filename) -> str:
        return "VolumeFile"

    def loadNodes(self, file_type, properties, loaded_nodes, user_messages=None) -> bool:
        path = Path(properties["fileName"])
        name = properties.get("name") or path.name.split(".")[0]
        node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name) if file_type == "VolumeFile" else None
        if node is None:
            return False
        loaded_nodes.AddItem(node)
        return True


class FakeWidget:
    """A widget of the .ui file: plain attributes for properties, signals by their Qt
    signature. A slot's exception is recorded in ``app.slot_errors`` (PythonQt prints it and
    carries on), so a test can assert that no slot failed."""

    def __init__(self, name: str, app: FakeApplication, widget_class: str = "QWidget", parameter_name: str = ""):
        self.objectName, self.app, self.widgetClass, self.parameterName = name, app, widget_class, parameter_name
        self.enabled, self.text, self.value, self.plainText, self.currentPath = True, "", 0, "", ""
        self._slots: dict[str, list] = {}
        self._blocked = False
        self._items: dict[tuple[int, int], object] = {}
        self._rows, self._current = 0, (-1, -1)

    def connect(self, signal: str, slot) -> None:
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        if self._blocked:
            return
        for slot in list(self._slots.get(signal, [])):
            try:
                slot(*args[:_positional_count(slot, len(args))])  # PythonQt drops arguments a slot does not take
            except Exception as error:  # noqa: BLE001 - as PythonQt: printed, recorded, not raised
                traceback.print_exc()
                self.app.slot_errors.append(error)

    def click(self) -> None:
        """A user's click: nothing happens on a disabled widget."""
        if self.enabled:
            self.emit("clicked(bool)", False)

    def show(self, value) -> None:
        """Display a parameter value as the parameter node wrapper's connector for this class does."""
        if self.widgetClass == "ctkPathLineEdit":
            self.currentPath = str(value)
        else:
            self.shown = value

    def setMRMLScene(self, scene) -> None:
        self.mrmlScene = scene

    def setRowCount(self, rows: int) -> None:
        self._rows = rows
        self._items = {key: item for key, item in self._items.items() if key[0] < rows}

    def rowCount(self) -> int:
        return self._rows

    def setItem(self, row: int, column: int, item) -> None:
        self._items[(row, column)] = item

    def item(self, row: int, column: int):
        return self._items.get((row, column))

    def setCurrentCell(self, row: int, column: int) -> None:
        """The user selects a cell (a table's current cell; no click signal)."""
        self._current = (row, column)

    def currentRow(self) -> int:
        return self._current[0] if self._current[0] < self._rows else -1

    def blockSignals(self, block: bool) -> bool:
        previous, self._blocked = self._blocked, block
        return previous

    def setPlainText(self, text: str) -> None:
        self.plainText = text
        self.emit("textChanged()")


def _positional_count(slot, available: int) -> int:
    import inspect

    parameters = inspect.signature(slot).parameters.values()
    if any(parameter.kind is parameter.VAR_POSITIONAL for parameter in parameters):
        return available
    return min(available, sum(parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                              for parameter in parameters))


def ui_widgets(ui_file: Path) -> list[tuple[str, str, str]]:
    """(name, class, SlicerParameterName or "") of every widget in a .ui file."""
    from xml.etree import ElementTree

    widgets = []
    for element in ElementTree.parse(ui_file).iter("widget"):
        parameter = next((prop.findtext("string") for prop in element.findall("property")
                          if prop.get("name") == "SlicerParameterName"), "")
        widgets.append((element.get("name"), element.get("class"), parameter))
    return widgets


class PanelHarness:
    """``slicer.app`` (a :class:`FakeApplication`), ``slicer.util.loadUI`` and
    ``childWidgetVariables`` (one :class:`FakeWidget` per widget of the .ui file) and an
    empty QSettings; everything restored by :meth:`close`."""

    def __init__(self, monkeypatch):
        import slicer.util

        self.app, self.widgets = FakeApplication(), []
        monkeypatch.setattr(slicer, "app", self.app, raising=False)
        monkeypatch.setattr(slicer.util, "loadUI", lambda path: self._load_ui(path))
        monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: widget.children)
        monkeypatch.setattr(_QSettings, "STORE", {})

    def _load_ui(self, path):
        root = FakeWidget(Path(path).stem, self.app)
        root.children = types.SimpleNamespace(**{name: FakeWidget(name, self.app, widget_class, parameter)
                                                 for name, widget_class, parameter in ui_widgets(path)})
        return root

    @property
    def settings(self) -> dict:
        return _QSettings.STORE

    def make_widget(self, module):
        """The module's Widget, set up and entered, as Slicer does when the module is opened."""
        widget = module.COLIPRISlicerWidget()
        widget.setup()
        widget.enter()
        self.widgets.append(widget)
        return widget

    def close(self) -> None:
        """Stop the panels observing the scene (the test scene is emptied next)."""
        for widget in self.widgets:
            widget.removeObservers()


# --- scene -------------------------------------------------------------------------------


class SlicerTestScene:
    """A scene with application logic, module logics and slice views, attached to ``slicer``.

    Use as a context manager; ``slicer.mrmlScene`` and ``slicer.modules`` are restored on exit.
    """

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.logics = {key: self._module_logic(name, cls) for key, (name, cls) in MODULE_LOGICS.items()}
        self.slice_logics = self._slice_views()
        self._saved = {}

    def _module_logic(self, name: str, class_name: str):
        shown = vtk.vtkObject.GetGlobalWarningDisplay()
        vtk.vtkObject.SetGlobalWarningDisplay(0)  # the colour logic wants an application home for its files
        try:
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
        finally:
            vtk.vtkObject.SetGlobalWarningDisplay(shown)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    def _slice_views(self) -> list:
        layout_logic = slicer.vtkMRMLLayoutLogic()
        layout_logic.SetMRMLScene(self.scene)
        layout_logic.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        self._layout_logic = layout_logic
        logics = []
        for name in SLICE_VIEWS:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            logic.SetSliceNode(self.slice_node(name))
            logics.append(logic)
        return logics

    def slice_node(self, name: str):
        return self.scene.GetNodeByID(f"vtkMRMLSliceNode{name}")

    def __enter__(self) -> SlicerTestScene:
        self._saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            **{key: types.SimpleNamespace(logic=lambda logic=logic: logic) for key, logic in self.logics.items()})
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self._saved.items():
            if value is None:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        self.close()

    def close(self) -> None:
        """Detach every logic from the scene, then empty it (clearing while attached crashes)."""
        shown = vtk.vtkObject.GetGlobalWarningDisplay()
        vtk.vtkObject.SetGlobalWarningDisplay(0)  # subject hierarchy logic warns about the missing scene
        try:
            for logic in [*self.slice_logics, self._layout_logic, *self.logics.values()]:
                logic.SetMRMLScene(None)
            self.app_logic.SetMRMLScene(None)
            self.scene.Clear(True)
        finally:
            vtk.vtkObject.SetGlobalWarningDisplay(shown)


def load_volume_file(path: Path, name: str):
    """Load a NRRD/NIfTI file as Slicer's Add Data does (``AddArchetypeVolume``)."""
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name)
    if node is None:
        raise RuntimeError(f'Slicer could not load "{path}".')
    return node


def load_dicom_series(folder: Path, work_dir: Path, name: str):
    """Read a DICOM series with SimpleITK, write it as NRRD, load that into the scene."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    path = Path(work_dir) / f"{name}.nrrd"
    sitk.WriteImage(reader.Execute(), str(path))
    return load_volume_file(path, name)


# --- offscreen rendering -----------------------------------------------------------------


def offscreen_rendering_available() -> bool:
    """True with an X display or an EGL library (``apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri``)."""
    import ctypes.util

    return bool(os.environ.get("DISPLAY")) or ctypes.util.find_library("EGL") is not None


def _node_image(node, array_kji: np.ndarray | None = None) -> vtk.vtkImageData:
    """Image data in IJK coordinates (origin 0, spacing 1) of a volume node or of an array on its grid."""
    image = vtk.vtkImageData()
    if array_kji is None:
        image.DeepCopy(node.GetImageData())
    else:
        image.SetDimensions(*reversed(array_kji.shape))
        scalars = vtk.util.numpy_support.numpy_to_vtk(np.ascontiguousarray(array_kji).ravel(), deep=True)
        image.GetPointData().SetScalars(scalars)
    image.SetOrigin(0, 0, 0)
    image.SetSpacing(1, 1, 1)
    return image


def _axial_reslice(image: vtk.vtkImageData, node, plane, interpolate: bool) -> vtk.vtkImageReslice:
    """Resample ``image`` (IJK of ``node``) on the axial plane ``plane = (origin_ra, spacing, size, s)``."""
    (r0, a0), spacing, (width, height), s_mm = plane
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(image)
    reslice.SetResliceAxes(ras_to_ijk)
    reslice.SetOutputOrigin(r0, a0, s_mm)
    reslice.SetOutputSpacing(spacing, spacing, 1.0)
    reslice.SetOutputExtent(0, width - 1, 0, height - 1, 0, 0)
    reslice.SetInterpolationModeToLinear() if interpolate else reslice.SetInterpolationModeToNearestNeighbor()
    reslice.SetBackgroundLevel(-1e30)
    reslice.Update()
    return reslice


def _image_actor(reslice: vtk.vtkImageReslice, table: vtk.vtkScalarsToColors) -> vtk.vtkImageActor:
    colours = vtk.vtkImageMapToColors()
    colours.SetInputConnection(reslice.GetOutputPort())
    colours.SetLookupTable(table)
    colours.SetOutputFormatToRGBA()
    colours.Update()
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputConnection(colours.GetOutputPort())
    return actor


def _grey_table(window: float, level: float) -> vtk.vtkLookupTable:
    table = vtk.vtkLookupTable()
    table.SetRange(level - window / 2, level + window / 2)
    table.SetSaturationRange(0, 0)
    table.SetHueRange(0, 0)
    table.SetValueRange(0, 1)
    table.SetBelowRangeColor(0, 0, 0, 1)
    table.UseBelowRangeColorOn()
    table.Build()
    return table


def _heat_table(lower: float, upper: float, opacity: float) -> vtk.vtkLookupTable:
    """Dark red to yellow (Slicer's PET-Heat without its white top, so the peak stays
    distinguishable from bone), fading in from transparent at ``lower`` to ``opacity``."""
    table = vtk.vtkLookupTable()
    table.SetNumberOfTableValues(256)
    table.SetRange(lower, upper)
    for index in range(256):
        t = index / 255
        table.SetTableValue(index, min(1.0, 0.4 + 1.2 * t), max(0.0, 2 * t - 0.8), 0.0, opacity * min(1.0, 2 * t))
    table.SetBelowRangeColor(0, 0, 0, 0)
    table.UseBelowRangeColorOn()
    return table


def _outline_actor(reslice: vtk.vtkImageReslice, colour) -> vtk.vtkActor:
    contour = vtk.vtkContourFilter()
    contour.SetInputConnection(reslice.GetOutputPort())
    contour.SetValue(0, 0.5)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(contour.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*colour)
    actor.GetProperty().SetLineWidth(3)
    return actor


def axial_plane(node, s_mm: float, size: int = 512) -> tuple:
    """A square axial plane covering the node's R-A extent: (origin_ra, spacing, size, s)."""
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    extent = max(bounds[1] - bounds[0], bounds[3] - bounds[2])
    centre = ((bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2)
    spacing = extent / size
    return (centre[0] - extent / 2, centre[1] - extent / 2), spacing, (size, size), float(s_mm)


def render_axial_overlay(ct_node, heatmap_node, segments: list[tuple[np.ndarray, tuple]], s_mm: float,
                         path: Path | None = None, *, size: int = 512, opacity: float = 0.6,
                         caption: str = "") -> np.ndarray:
    """Render an axial slice offscreen: CT (layer 0), heatmap (layer 1), segment outlines (layer 2).

    Args:
        segments: (mask (K, J, I) uint8 on the CT's grid, (r, g, b)) per segment.
        s_mm: S (mm) of the axial plane.
        path: PNG to write, or None.

    Returns:
        (height, width, 3) uint8 RGB, row 0 at the top, patient's right on the left (radiological).
    """
    plane = axial_plane(ct_node, s_mm, size)
    display = heatmap_node.GetDisplayNode()
    layers = [[_image_actor(_axial_reslice(_node_image(ct_node), ct_node, plane, True), _grey_table(1500, -400))],
              [_image_actor(_axial_reslice(_node_image(heatmap_node), heatmap_node, plane, True),
                            _heat_table(display.GetLowerThreshold(), display.GetWindowLevelMax(), opacity))],
              [_outline_actor(_axial_reslice(_node_image(ct_node, mask.astype(np.float32)), ct_node, plane, False),
                              colour) for mask, colour in segments]]
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.SetNumberOfLayers(len(layers) + 1)
    renderers = []
    for layer, actors in enumerate(layers + [[_caption_actor(caption)] if caption else []]):
        renderer = vtk.vtkRenderer()
        renderer.SetLayer(layer)
        for actor in actors:
            renderer.AddViewProp(actor)
        window.AddRenderer(renderer)
        renderers.append(renderer)
    _axial_camera(renderers, plane)
    window.Render()
    rgb = _window_pixels(window)
    if path is not None:
        _write_png(window, path)
    return rgb


def _caption_actor(text: str) -> vtk.vtkTextActor:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.GetTextProperty().SetFontSize(14)
    actor.GetTextProperty().SetColor(1, 1, 1)
    actor.GetTextProperty().SetBackgroundColor(0, 0, 0)
    actor.GetTextProperty().SetBackgroundOpacity(0.75)
    actor.SetDisplayPosition(8, 8)
    return actor


def _axial_camera(renderers, plane) -> None:
    """Look from the feet (+S), anterior up: patient's right appears on the left."""
    (r0, a0), spacing, (width, height), s_mm = plane
    centre = (r0 + spacing * (width - 1) / 2, a0 + spacing * (height - 1) / 2, s_mm)
    camera = renderers[0].GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1], s_mm - 500.0)
    camera.SetViewUp(0, 1, 0)
    camera.SetParallelScale(spacing * height / 2)
    camera.SetClippingRange(1.0, 1000.0)
    for renderer in renderers[1:]:
        renderer.SetActiveCamera(camera)


def _window_pixels(window) -> np.ndarray:
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.flipud(pixels[..., :3]).copy()


def _write_png(window, path: Path) -> None:
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def ras_to_pixel(plane, point_ras) -> tuple[int, int]:
    """(row, column) of a RAS point in :func:`render_axial_overlay` output (radiological view)."""
    (r0, a0), spacing, (width, height), _ = plane
    column = width - 1 - int(round((point_ras[0] - r0) / spacing))
    row = height - 1 - int(round((point_ras[1] - a0) / spacing))
    return row, column


# --- Slicer versions -----------------------------------------------------------------------


def without_slicer_packaging(monkeypatch) -> None:
    """As on Slicer 5.10: ``import slicer.packaging`` fails (it came with Slicer 5.11/5.12)."""
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.delattr(slicer, "packaging", raising=False)


def with_slicer_packaging(monkeypatch, calls: list) -> None:
    """As on Slicer 5.12: a ``slicer.packaging`` whose ``pip_ensure`` records its arguments."""
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **kwargs: calls.append(("pip_ensure", list(requirements), kwargs))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)


def fake_pytorch_utils(monkeypatch, calls: list, installed=True) -> None:
    """The PyTorch extension's ``PyTorchUtils``: ``installTorch`` records its arguments and
    returns a module (or None when ``installed`` is False, as when the user declines)."""
    import importlib.machinery

    module = types.ModuleType("PyTorchUtils")
    module.__spec__ = importlib.machinery.ModuleSpec("PyTorchUtils", None)

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):
            calls.append(("installTorch", kwargs))
            return types.ModuleType("torch") if installed else None

    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", module)
