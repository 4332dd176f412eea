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
