"""The module's Logic without the module base class: nodes in, engine on the shared worker
thread, nodes out. Usable without the Widget (the self-test and Python scripts use it).

Results are kept per volume *content and geometry* (:func:`volume_nodes.volume_signature`),
at most ``MAX_RESULTS`` of them (least recently used dropped first), and without full-size
heatmaps: those are resampled from the patch-grid maps when shown. A job whose volume left
the scene (Close Scene) or whose cancel event was set adds no nodes.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict

import slicer

from . import dicom_nodes, importer, outputs, runtime, views, volume_nodes
from .session import EngineOptions, EngineSession, shared_session

#: Analyses kept in memory (each holds a copy of its volume and its patch embeddings).
MAX_RESULTS = 2


def _application_process_events() -> None:
    """Slicer's event loop (looked up at call time; nothing without ``slicer.app``)."""
    app = getattr(slicer, "app", None)
    if app is not None:
        app.processEvents()


class ResultStore:
    """Analyses keyed by volume signature; one per volume node, at most ``capacity`` in all."""

    def __init__(self, capacity: int = MAX_RESULTS):
        self.capacity = capacity
        self._results: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._results)

    def values(self) -> list:
        return list(self._results.values())

    def get(self, signature):
        result = self._results.get(signature)
        if result is not None:
            self._results.move_to_end(signature)
        return result

    def has_volume(self, node_id: str) -> bool:
        return any(key[0] == node_id for key in self._results)

    def put(self, signature, result) -> None:
        for key in [key for key in self._results if key[0] == signature[0]]:
            del self._results[key]  # the same node analysed again (e.g. after an edit)
        self._results[signature] = result
        while len(self._results) > self.capacity:
            self._results.popitem(last=False)

    def clear(self) -> None:
        self._results.clear()


class AnalysisLogic:
    """Analyze a volume node, then query the analysis (heatmaps, findings, segmentation, snippets).

    Args:
        processEvents: called while waiting for the worker (default: Slicer's event loop).
        session: the engine session (default: the one every Logic in this process shares).
    """

    def __init__(self, processEvents=None, session: EngineSession | None = None) -> None:
        self.processEvents = processEvents or _application_process_events
        self.session = session or shared_session()
        self.options = self.session.options  # a new Logic uses the model already loaded
        self.results = ResultStore()
        self.inputVolumeNode = None
        self.lastSegmentation = (lambda: None, None)  # (weak reference to its analysis, SegmentationResult)

    def configure(self, modelSource="demo", modelFolder=None, device="auto", precision="auto", offline=False,
                  diskCache=False) -> None:
        """Choose the model and device; a change (or ``modelSource=None``) unloads the model and its results.
        ``diskCache``: keep encodings in the user cache folder (size-bounded) so a scan reopens fast."""
        options = None
        if modelSource is not None:
            options = EngineOptions(modelSource, runtime.path_text(modelFolder), device, precision, offline,
                                    diskCache)
        changed = options is None or dataclasses.replace(options, disk_cache=self.options.disk_cache) != self.options
        self.session.configure(options)
        if changed:
            self.clearResults()
        self.options = options or self.options

    def shutdown(self) -> bool:
        """Stop the worker thread (at most 2 s, the GUI kept responsive); True when it stopped."""
        return self.session.shutdown(self.processEvents)

    def clearResults(self) -> None:
        """Forget the analyses (scene closed or model changed); their nodes stay in the scene."""
        self.results.clear()
        self.inputVolumeNode = None
        self.lastSegmentation = (lambda: None, None)

    def clearDownloads(self) -> list:
        """Delete downloaded weights and cached encodings once no background job reads them."""
        self.session.wait_idle(self.processEvents)
        self.configure(None)
        return runtime.clear_downloads()

    @property
    def result(self):
        """The analysis of the current input volume as it is now (None if it changed since)."""
        node = self.inputVolumeNode
        return self.results.get(volume_nodes.volume_signature(node)) if node is not None else None

    def outputNode(self, role: str):
        return outputs.find_output(slicer.mrmlScene, self.inputVolumeNode, role) if self.inputVolumeNode else None

    def modelDescription(self) -> str:
        return runtime.describe_model(self.result.model if self.result else {})

    def volumeFromNode(self, volumeNode):
        return volume_nodes.volume_from_node(volumeNode)

    def _call(self, function, statusCallback=None):
        self.session.configure(self.options)  # another Logic may have loaded another model
        return self.session.call(function, statusCallback, self.processEvents)

    def run(self, inputVolumeNode, cancelEvent=None, statusCallback=None) -> dict:
        """Analyze a volume; returns the created ``table``, ``series``, ``chart`` and ``report`` nodes.

        Raises:
            AnalysisCancelled: when ``cancelEvent`` is set, or the volume left the scene (Close
                Scene), before the results are imported (nothing added).
        """
        volume, cancel = self.volumeFromNode(inputVolumeNode), cancelEvent or threading.Event()
        signature = volume_nodes.volume_signature(inputVolumeNode)

        def work():
            analyzer = self.session.analyzer()
            result = analyzer.analyze(volume, cancel=cancel, status_callback=self.session.messages.put)
            return result, analyzer.report(result).to_text()
        result, reportText = self._call(work, statusCallback)
        _ensureWanted(inputVolumeNode, cancel)
        self.session.prepare(lambda: self.session.analyzer().prepare_queries(result))  # in the background
        if statusCallback is not None:
            statusCallback("Importing results")
        nodes = importer.import_analysis(inputVolumeNode, result.findings, reportText, result.model)
        self.results.put(signature, result)
        self.inputVolumeNode = inputVolumeNode
        return nodes

    def _requireResult(self):
        if self.result is not None:
            return self.inputVolumeNode, self.result
        if self.inputVolumeNode is not None and self.results.has_volume(self.inputVolumeNode.GetID()):
            message = (f'Volume "{self.inputVolumeNode.GetName()}" changed since it was analysed (voxels, geometry'
                       " or transform); press Analyze again.")
            raise ValueError(message)
        raise ValueError("Analyze a volume first.")

    def _query(self, function):
        """Run a query on the worker; raises AnalysisCancelled if the volume left the scene meanwhile."""
        node, result = self._requireResult()
        value = self._call(lambda: function(result))
        _ensureWanted(node)
        _releaseFullSizeMaps(result)
        return node, result, value

    def showHeatmap(self, findingName: str, opacity: float = 0.5):
        """Heatmap of a finding as the foreground layer; slice views jump to its peak."""
        from COLIPRISlicerLib.findings.scoring import heatmap_on_host

        def heatmap(result):  # on the engine's device (a GPU: there, then one copy), in Slicer's memory order
            finding = result.finding(findingName)
            return finding, heatmap_on_host(finding, result.encoding.grid, result.volume, result.device)
        node, _, (finding, values) = self._query(heatmap)
        heatmapNode = importer.import_heatmap(node, values, finding.name, adopt=True)  # computed for this node alone
        views.show_heatmap(node, heatmapNode, opacity)
        views.jump_slices(slicer.mrmlScene, finding.peak_ras)
        return heatmapNode

    def addFinding(self, text: str):
        """Score a free-text finding on the cached embeddings and add it to the findings table."""
        node, result, finding = self._query(lambda result: self.session.analyzer().add_finding(result, text))
        importer.update_findings(node, result.findings)
        return finding

    def segment(self, head=None):
        """Segmentation node from a trained head folder, or zero-shot from the heatmaps."""
        node, result, segmentation = self._query(lambda result: self.session.analyzer().segment(result, head=head))
        self.lastSegmentation = (weakref.ref(result), segmentation)  # Export to DICOM writes it as the SEG
        return importer.import_segmentation(node, segmentation)

    def exportDicom(self, folder, toDatabase: bool = True):
        """Write the current analysis as a DICOM SR (TID 1500) and, after Segment, a DICOM SEG into
        ``folder/dicom``; a volume loaded from Slicer's DICOM database joins its own study. Returns the
        folder and whether the files were imported into the DICOM database."""
        from COLIPRISlicerLib.export.dicom import export_dicom
        from COLIPRISlicerLib.export.dicom_source import with_dicom_files

        node, result = self._requireResult()
        files, report = dicom_nodes.source_files(node), self.outputNode("report")
        text = report.GetText() if report is not None else None
        segmentation = self.lastSegmentation[1] if self.lastSegmentation[0]() is result else None

        def export(result):
            source = dataclasses.replace(result, volume=with_dicom_files(result.volume, files)) if files else result
            return export_dicom(source, folder, segmentation=segmentation, report_text=text)
        _, _, written = self._query(export)
        return written, toDatabase and dicom_nodes.import_into_database(written)

    def localizeSnippet(self, text: str):
        """Jump slice views to where a report snippet points and mark it; returns the localisation."""
        node, _, localization = self._query(lambda result: self.session.analyzer().localize(result, text))
        importer.import_localization(node, localization, text)
        views.jump_slices(slicer.mrmlScene, localization.point_ras)
        return localization


def _ensureWanted(node, cancel: threading.Event | None = None) -> None:
    """Raise AnalysisCancelled when the user cancelled or the node left the scene (Close Scene)."""
    from COLIPRISlicerLib.analysis import AnalysisCancelled

    if cancel is not None and cancel.is_set():
        raise AnalysisCancelled("Analysis cancelled; no results were produced.")
    scene = node.GetScene()
    if scene is None or not scene.IsNodePresent(node):
        raise AnalysisCancelled(f'Volume "{node.GetName()}" left the scene (scene closed?); nothing was added.')


def _releaseFullSizeMaps(result) -> None:
    """Drop heatmaps kept at input resolution (about 145 MB each for 512 x 512 x 139); the
    patch-grid maps stay and a shown map is resampled again when asked for."""
    heatmaps = getattr(result, "_heatmaps", None)
    if heatmaps:
        heatmaps.clear()
