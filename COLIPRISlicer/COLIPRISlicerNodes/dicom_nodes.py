"""DICOM from inside Slicer: the input's own files from Slicer's DICOM database (so an export joins
the input's study), and the written SEG and SR imported back into that database."""

from __future__ import annotations

import logging
from pathlib import Path

import slicer

#: Attribute Slicer's DICOM plugins put on a loaded scalar volume: its SOP Instance UIDs, space-separated.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"


def source_files(volumeNode) -> list[str]:
    """The DICOM files a volume was loaded from (Slicer's DICOM database), or [] when it was not
    loaded from DICOM or one of its files is no longer in the database."""
    uids = (volumeNode.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return []
    files = [database.fileForInstance(uid) for uid in uids]
    if not all(files):
        logging.warning("Some DICOM files of %s are no longer in the database; exporting as a new study.",
                        volumeNode.GetName())
        return []
    return files


def import_into_database(folder: Path) -> bool:
    """Import the files under ``folder`` into Slicer's DICOM database; False when none is open."""
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not database.isOpen:
        return False
    from DICOMLib import DICOMUtils

    DICOMUtils.importDicom(str(folder), database)
    return True


def load_series(series_uid: str, source: str = ""):
    """Load a series from Slicer's DICOM database with Slicer's DICOM plugins; returns its scalar volume node.

    Raises:
        ValueError: when no DICOM database is open or the series is not (or no longer) in it.
    """
    database = getattr(slicer, "dicomDatabase", None)
    where = f' (indexed from "{source}")' if source else ""
    if database is None or not database.isOpen or not database.filesForSeries(series_uid):
        message = (f"Series {series_uid}{where} is not in Slicer's DICOM database: import its folder in the DICOM"
                   " module (Import DICOM files), then double-click it again.")
        raise ValueError(message)
    from DICOMLib import DICOMUtils

    nodes = [slicer.mrmlScene.GetNodeByID(node_id) for node_id in DICOMUtils.loadSeriesByUID([series_uid])]
    volumes = [node for node in nodes if node is not None and node.IsA("vtkMRMLScalarVolumeNode")]
    if not volumes:
        raise ValueError(f"Slicer's DICOM plugins loaded no volume from series {series_uid}{where}.")
    return volumes[0]
