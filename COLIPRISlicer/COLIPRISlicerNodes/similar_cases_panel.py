"""The panel's *Similar cases* section: index folder and its status, Index DICOM database (a
Cancel button while it runs), the three searches and the results table (double-click loads a
case beside the current volume). Every action is one of the panel's jobs (one at a time, never
nested waits). Indexing goes on when the user leaves the module or closes the scene (it adds no
node and does not depend on the scene); quitting or reloading the module cancels it between two
series, and what was indexed stays in the (resumable) index.
"""

from __future__ import annotations

import threading

import qt
from slicer.i18n import tr as _

from .similar_cases import REGIONS, SimilarCasesLogic, folder_status, hit_cells


class SimilarCasesSection:
    """The section's widgets (``panel.ui``) over a :class:`SimilarCasesLogic` of the panel's Logic."""

    def __init__(self, panel) -> None:
        self.panel, self.ui = panel, panel.ui
        self.logic = SimilarCasesLogic(panel.logic)
        self.hits: list = []
        self.indexing = False
        self.progress = None  # the running indexing's latest IndexProgress
        self.cancelEvent = threading.Event()
        self._folderStatus = (None, None)  # (folder, FolderStatus) shown

    def setup(self) -> None:
        self.ui.indexDatabaseButton.connect("clicked(bool)", self.onIndexButton)
        self.ui.similarByVolumeButton.connect("clicked(bool)", lambda: self.onSearch("volume"))
        self.ui.similarByTextButton.connect("clicked(bool)", lambda: self.onSearch("text"))
        self.ui.similarByFindingButton.connect("clicked(bool)", lambda: self.onSearch("finding"))
        self.ui.similarResultsTableWidget.connect("cellDoubleClicked(int,int)", self.onResultDoubleClicked)

    def cancel(self) -> None:
        """Stop indexing before the next series (module unloaded)."""
        self.cancelEvent.set()

    def folder(self) -> str:
        parameters = self.panel._parameterNode
        return parameters.settings.indexFolder if parameters is not None else ""

    def showState(self) -> None:
        """Buttons enabled when no job runs (the index button is Cancel while indexing); folder status."""
        idle = not (self.panel.runState.busy or self.panel.jobs.running)
        self.ui.indexDatabaseButton.text = _("Cancel indexing") if self.indexing else _("Index DICOM database")
        self.ui.indexDatabaseButton.enabled = (self.indexing and not self.cancelEvent.is_set()) or idle
        for widget in (self.ui.similarByVolumeButton, self.ui.similarByTextButton, self.ui.similarByFindingButton,
                       self.ui.similarResultsTableWidget):
            widget.enabled = idle
        folder = self.folder()
        if self._folderStatus[0] != folder:
            self._folderStatus = (folder, folder_status(folder))
        self.ui.indexFolderStatusLabel.text = self._folderStatus[1].text

    def onIndexButton(self) -> None:
        if self.indexing:
            self.cancelEvent.set()
            self.ui.indexStatusLabel.text = _("Cancelling after the series being indexed...")
            self.panel.showState()
            return
        self.panel.runJob(_("Indexing the DICOM database failed."), self.runIndexing)

    def runIndexing(self) -> None:
        settings = self.panel._parameterNode.settings
        folder, self.cancelEvent, self.indexing, self.progress = settings.indexFolder, threading.Event(), True, None
        try:
            self.panel.showState()
            self.panel.configureEngine(settings)
            self.ui.indexStatusLabel.text = _("Reading the DICOM database...")
            run = self.logic.buildIndex(folder, self.cancelEvent, self.onProgress, self.onEngineStatus)
        finally:
            self.indexing, self._folderStatus = False, (None, None)  # the folder's content changed
        failed = _(", {n} could not be read").format(n=len(run.failed)) if run.failed else ""
        summary = _("{new} series added, {old} already indexed{failed}.").format(
            new=len(run.indexed), old=len(run.skipped), failed=failed)
        if run.cancelled:
            summary = _("Cancelled: ") + summary + _(" Press Index DICOM database again to go on.")
        self.ui.indexStatusLabel.text = summary

    def onEngineStatus(self, message: str) -> None:
        """Engine lines (downloading, loading the model) until the first series is done."""
        if self.progress is None and not self.cancelEvent.is_set():
            self.ui.indexStatusLabel.text = message

    def onProgress(self, progress) -> None:
        self.progress = progress
        self.ui.indexProgressBar.maximum = progress.total
        self.ui.indexProgressBar.value = progress.done
        self.ui.indexStatusLabel.text = progress.text

    def onSearch(self, kind: str) -> None:
        parameters = self.panel._parameterNode
        settings, folder = parameters.settings, parameters.settings.indexFolder
        options = {"region": REGIONS[parameters.similarRegion], "where": parameters.similarWhere.strip() or None,
                   "k": parameters.similarCount}
        if kind == "volume":
            volume = parameters.inputVolume
            query = lambda: self.logic.searchByVolume(folder, volume, **options)  # noqa: E731
        elif kind == "text":
            text = parameters.similarQuery
            query = lambda: self.logic.searchByText(folder, text, **options)  # noqa: E731
        else:
            row = self.ui.findingsTableWidget.currentRow()
            name = self.ui.findingsTableWidget.item(row, 0).text() if row >= 0 else None
            query = lambda: self.logic.searchByFinding(folder, self._requireFinding(name), **options)  # noqa: E731

        def search():
            self.panel.configureEngine(settings)
            self.showHits(query(), options["where"])
        self.panel.runJob(_("Similar-case search failed."), search)

    @staticmethod
    def _requireFinding(name):
        if not name:
            raise ValueError(_("Select a finding in the Findings table first (after Analyze)."))
        return name

    def showHits(self, hits: list, where: str | None) -> None:
        self.hits = hits
        table = self.ui.similarResultsTableWidget
        table.setRowCount(len(hits))
        for row, hit in enumerate(hits):
            for column, text in enumerate(hit_cells(hit)):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        if hits:
            self.ui.similarResultsLabel.text = _("{n} similar cases; double-click one to load it beside the"
                                                 " current volume.").format(n=len(hits))
        else:
            hint = _("loosen the filter") if where else _("compare the whole scan")
            self.ui.similarResultsLabel.text = _("No indexed series matched; {hint}.").format(hint=hint)

    def onResultDoubleClicked(self, row: int, column: int) -> None:
        if not 0 <= row < len(self.hits):
            return
        hit, beside = self.hits[row], self.panel._parameterNode.inputVolume if self.panel._parameterNode else None

        def load():
            node = self.logic.loadHit(hit, beside)
            self.ui.similarResultsLabel.text = _('"{name}" is shown beside the current volume.').format(
                name=node.GetName())
        self.panel.runJob(_("Could not load the similar case."), load)
