"""SOURCE arguments -> one entry per series: image files, folders, DICOM folders, ctkDICOM.sql."""

from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import closing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from COLIPRISlicerLib.io.volume import IMAGE_SUFFIXES, Volume, load_volume

logger = logging.getLogger(__name__)

#: Query of a Slicer/CTK DICOM database: every image file with its series and study.
_CTK_QUERY = ("SELECT Images.SeriesInstanceUID, Series.StudyInstanceUID, Images.Filename FROM Images"
              " LEFT JOIN Series ON Images.SeriesInstanceUID = Series.SeriesInstanceUID"
              " ORDER BY Images.SeriesInstanceUID, Images.Filename")
#: Per series of a CTK database: modality, patient and study date (CTK schema 0.6: Patients, Studies).
_CTK_METADATA_QUERY = ("SELECT Series.SeriesInstanceUID, Series.Modality, Patients.PatientsName, Patients.PatientID,"
                       " Studies.StudyDate FROM Series"
                       " LEFT JOIN Studies ON Series.StudyInstanceUID = Studies.StudyInstanceUID"
                       " LEFT JOIN Patients ON Studies.PatientsUID = Patients.UID")


@dataclass(frozen=True)
class SeriesEntry:
    """One series to index.

    Attributes:
        source: the image file as given, or the folder holding the DICOM series.
        files: the series' DICOM files (empty for an image file).
        series_uid: SeriesInstanceUID, None for an image file.
        study_uid: StudyInstanceUID when known.
        patient_name, patient_id, study_date: PatientName (DICOM PN, e.g. ``Doe^Jane``), PatientID and
            StudyDate (``YYYY-MM-DD``) when known.
    """

    source: str
    files: tuple[str, ...] = ()
    series_uid: str | None = None
    study_uid: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    study_date: str | None = None

    @property
    def key(self) -> str:
        """What identifies the series in an index: its UID, else its path."""
        return self.series_uid or self.source


def expand_sources(sources: Sequence[str | Path]) -> list[SeriesEntry]:
    """Every series under the given files, folders (searched recursively) and ctkDICOM.sql databases.

    Raises:
        FileNotFoundError: if a source does not exist.
    """
    entries: list[SeriesEntry] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f'Source not found: "{path}"; give image files, folders or a ctkDICOM.sql file.')
        if path.is_file() and path.suffix.lower() == ".sql":
            entries += ctk_database_series(path)
        elif path.is_file():
            entries.append(SeriesEntry(str(path)))
        else:
            entries += folder_series(path)
    unique: dict[str, SeriesEntry] = {}
    for entry in entries:
        earlier = unique.get(entry.key)
        if earlier is not None and entry.files and set(earlier.files) != set(entry.files):
            logger.warning('Series "%s" has files in "%s" and in "%s"; only those in the second are indexed. Put the'
                           " files of a series in one folder.", entry.key, earlier.source, entry.source)
        unique[entry.key] = entry
    return list(unique.values())


def folder_series(folder: Path) -> list[SeriesEntry]:
    """Image files and DICOM series (one entry each) in ``folder`` and its subfolders, sorted."""
    import SimpleITK as sitk

    entries = []
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns about every folder without DICOM files
    try:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            entries += [SeriesEntry(str(Path(root) / name)) for name in sorted(files)
                        if name.lower().endswith(IMAGE_SUFFIXES)]
            for series_uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root) or ():
                series_files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, series_uid))
                entries.append(SeriesEntry(root, series_files, series_uid or None,  # GDCM says "" for a missing UID
                                           **_dicom_metadata(series_files[0])))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return entries


def ctk_database_series(database: Path) -> list[SeriesEntry]:
    """The CT series of a Slicer/CTK DICOM database (``ctkDICOM.sql``) with patient and study date;
    relative file names are taken relative to the database's folder. Series of another modality
    (MR, SEG, SR, ...) are left out.

    Raises:
        ValueError: if the file is not such a database.
    """
    try:
        with closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            rows = connection.execute(_CTK_QUERY).fetchall()
            metadata = _ctk_metadata(connection)
    except sqlite3.DatabaseError as error:
        message = f'"{database}" is not a Slicer/CTK DICOM database ({error}); give the ctkDICOM.sql of a DICOM folder.'
        raise ValueError(message) from error
    files: dict[str, list[str]] = {}
    studies: dict[str, str | None] = {}
    for series_uid, study_uid, filename in rows:
        files.setdefault(series_uid, []).append(str(database.parent / filename))  # absolute names stay absolute
        studies[series_uid] = study_uid
    known = {uid: metadata.get(uid, (None,) * 4) for uid in files}
    return [SeriesEntry(str(Path(names[0]).parent), tuple(names), uid, studies[uid], *known[uid][1:])
            for uid, names in files.items() if known[uid][0] in ("CT", None)]


def _ctk_metadata(connection: sqlite3.Connection) -> dict[str, tuple]:
    """SeriesInstanceUID -> (modality, patient name, patient ID, study date); {} for a database
    without CTK's Patients and Studies tables."""
    try:
        rows = connection.execute(_CTK_METADATA_QUERY).fetchall()
    except sqlite3.OperationalError as error:
        logger.info("No patient or study table in the DICOM database (%s); indexing without them.", error)
        return {}
    return {uid: (modality, name, patient_id, iso_date(date)) for uid, modality, name, patient_id, date in rows}


def iso_date(value) -> str | None:
    """A DICOM date (``YYYYMMDD``) or CTK's stored date (``YYYY-MM-DD``) as ``YYYY-MM-DD``; None stays None."""
    text = None if value is None else str(value).strip()
    if text and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or None


def load_series(entry: SeriesEntry) -> Volume:
    """The series as a ``Volume`` (its DICOM files read in slice order, or the image file).

    Raises:
        ValueError: if the files cannot be read as one 3-D CT volume, cover less than
            ``volume.MIN_EXTENT_MM`` along an axis, or hold values that do not look like CT.
        FileNotFoundError: if the image file is gone.
    """
    import warnings

    from COLIPRISlicerLib.io.volume import check_extent, non_ct_reason

    with warnings.catch_warnings():  # a non-CT series is refused below, in one line
        warnings.filterwarnings("ignore", message=".*does not look like CT", category=RuntimeWarning)
        volume = load_volume(entry.source) if not entry.files else _read_series_files(entry)
    what = f'Series "{entry.key}"' if entry.files else f'"{entry.source}"'
    if entry.files:
        check_extent(volume.shape, volume.ijk_to_ras, what, dicom=True)
    reason = non_ct_reason(volume.array)
    if reason:
        raise ValueError(f"{what}: {reason} Only CT series can be indexed.")
    return volume


def _read_series_files(entry: SeriesEntry) -> Volume:
    """A DICOM series' files read with ITK in slice order (ValueError when unreadable)."""
    import SimpleITK as sitk

    from COLIPRISlicerLib.io.volume import scalar_array_from_sitk

    folder = str(Path(entry.files[0]).parent)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, entry.series_uid or "") or list(entry.files))
    try:
        image = reader.Execute()
    except RuntimeError as error:
        message = f'Series "{entry.key}" in "{entry.source}" is unreadable: {" ".join(str(error).split())[:200]}'
        raise ValueError(message) from None
    array, ijk_to_ras = scalar_array_from_sitk(image, f'Series "{entry.key}"', "a 3-D scalar CT")
    return Volume.from_array(array, ijk_to_ras, name=entry.series_uid or Path(entry.source).name)


#: SeriesEntry field -> DICOM keyword read from a series' first file.
_DICOM_METADATA = {"study_uid": "StudyInstanceUID", "patient_name": "PatientName", "patient_id": "PatientID",
                   "study_date": "StudyDate"}


def _dicom_metadata(file: str) -> dict[str, str | None]:
    """StudyInstanceUID, PatientName, PatientID and StudyDate of a DICOM file (None when absent)."""
    import pydicom

    dataset = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=list(_DICOM_METADATA.values()))
    values = {field: str(dataset.get(keyword)) if dataset.get(keyword) not in (None, "") else None
              for field, keyword in _DICOM_METADATA.items()}
    return {**values, "study_date": iso_date(values["study_date"])}
