"""Slicer's DICOM database for tests: CT series written as DICOM files, a ``ctkDICOM.sql`` with
CTK's schema (0.6: Patients, Studies, Series, Images; file names relative to the database
folder, as CTK stores files it copied into ``<database>/dicom``), a ``slicer.dicomDatabase``
that answers from that SQLite file as ``ctkDICOMDatabase`` does, and a ``DICOMLib.DICOMUtils``
whose ``loadSeriesByUID`` loads a series as Slicer's DICOMScalarVolumePlugin does (files sorted
along the slice normal, ``AddArchetypeScalarVolume`` with the file list, ``DICOM.instanceUIDs``
set, node IDs returned; ``OSError`` when the database is closed, ``[]`` for an unknown series).
"""

from __future__ import annotations

import sqlite3
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: CTK's ``dicom-schema.sql`` (schema 0.6), the columns this project reads or CTK requires.
CTK_SCHEMA = """
CREATE TABLE 'SchemaInfo' ( 'Version' VARCHAR(1024) NOT NULL );
INSERT INTO 'SchemaInfo' VALUES('0.6.0');
CREATE TABLE 'Images' ('SOPInstanceUID' VARCHAR(64) NOT NULL, 'Filename' VARCHAR(1024) NOT NULL,
  'SeriesInstanceUID' VARCHAR(64) NOT NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL, PRIMARY KEY ('SOPInstanceUID'));
CREATE TABLE 'Patients' ('UID' INTEGER PRIMARY KEY AUTOINCREMENT, 'PatientsName' VARCHAR(255) NULL,
  'PatientID' VARCHAR(255) NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL);
CREATE TABLE 'Studies' ('StudyInstanceUID' VARCHAR(64) NOT NULL, 'PatientsUID' INT NOT NULL,
  'StudyDate' DATE NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL, PRIMARY KEY ('StudyInstanceUID'));
CREATE TABLE 'Series' ('SeriesInstanceUID' VARCHAR(64) NOT NULL, 'StudyInstanceUID' VARCHAR(64) NOT NULL,
  'SeriesNumber' INT NULL, 'SeriesDescription' VARCHAR(255) NULL, 'Modality' VARCHAR(20) NULL,
  'InsertTimestamp' VARCHAR(20) NOT NULL, PRIMARY KEY ('SeriesInstanceUID'));
"""
_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class CTSeries:
    """One CT series: ``array`` (I, J, K) int16 in HU on ``ijk_to_ras`` (4 x 4, K along the
    slice normal), with its patient and study."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    series_uid: str
    study_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    modality: str = "CT"
    description: str = "chest"


def write_series(series: CTSeries, folder: Path) -> list[Path]:
    """One DICOM file per slice (CT Image Storage, int16, rescale 1/0) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    linear = _LPS @ series.ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    orientation = np.concatenate([linear[:, 0] / spacing[0], linear[:, 1] / spacing[1]])
    paths = []
    for k in range(series.array.shape[2]):
        position = _LPS @ (series.ijk_to_ras[:3, 3] + k * series.ijk_to_ras[:3, 2])
        dataset = _slice_dataset(series, f"{series.series_uid}.{k + 1}", k + 1)
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
        dataset.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        dataset.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # rows (J), then columns (I)
        dataset.SliceThickness = f"{spacing[2]:.6f}"
        pixels = np.ascontiguousarray(series.array[:, :, k].T.astype(np.int16))  # (rows J, columns I)
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.PixelData = pixels.tobytes()
        paths.append(folder / f"{k + 1:04d}.dcm")
        dataset.save_as(paths[-1], enforce_file_format=True)
    return paths


def _slice_dataset(series: CTSeries, sop_uid: str, number: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, sop_uid
    dataset.Modality, dataset.SeriesDescription, dataset.SeriesNumber = series.modality, series.description, 1
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = series.study_uid, series.series_uid
    dataset.FrameOfReferenceUID = series.study_uid + ".0"
    dataset.PatientName, dataset.PatientID, dataset.StudyDate = series.patient_name, series.patient_id, series.study_date
    dataset.InstanceNumber = number
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    dataset.RescaleIntercept, dataset.RescaleSlope = "0", "1"
    return dataset


def write_ctk_database(directory: Path, series_list: list[CTSeries]) -> Path:
    """Write each series into ``directory/dicom/<n>/`` and list it in ``directory/ctkDICOM.sql``
    with relative file names; returns the database file."""
    database = directory / "ctkDICOM.sql"
    with sqlite3.connect(database) as connection:
        connection.executescript(CTK_SCHEMA)
        for number, series in enumerate(series_list):
            files = write_series(series, directory / "dicom" / str(number))
            _insert(connection, series, [path.relative_to(directory).as_posix() for path in files])
    connection.close()
    return database


def _insert(connection: sqlite3.Connection, series: CTSeries, filenames: list[str]) -> None:
    now = "2026-01-01 00:00:00"
    patient = connection.execute("INSERT INTO Patients (PatientsName, PatientID, InsertTimestamp) VALUES (?, ?, ?)",
                                 (series.patient_name, series.patient_id, now)).lastrowid
    iso_date = f"{series.study_date[:4]}-{series.study_date[4:6]}-{series.study_date[6:]}"  # CTK binds a QDate
    connection.execute("INSERT OR IGNORE INTO Studies VALUES (?, ?, ?, ?)", (series.study_uid, patient, iso_date, now))
    connection.execute("INSERT INTO Series VALUES (?, ?, 1, ?, ?, ?)",
                       (series.series_uid, series.study_uid, series.description, series.modality, now))
    connection.executemany("INSERT INTO Images VALUES (?, ?, ?, ?)",
                           [(f"{series.series_uid}.{n + 1}", name, series.series_uid, now)
                            for n, name in enumerate(filenames)])


class DICOMDatabase:
    """``slicer.dicomDatabase`` (a ctkDICOMDatabase) over a ctkDICOM.sql: the calls this project makes."""

    def __init__(self, database_file: Path | None):
        self.databaseFilename = str(database_file) if database_file is not None else ""
        self.databaseDirectory = str(Path(database_file).parent) if database_file is not None else ""
        self.isOpen = database_file is not None  # Slicer always has one; closed until a folder is chosen

    def _query(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(f"file:{self.databaseFilename}?mode=ro", uri=True) as connection:
            rows = connection.execute(sql, args).fetchall()
        connection.close()
        return rows

    def _absolute(self, name: str) -> str:
        return str(Path(self.databaseDirectory) / name)  # CTK: relative names are inside the database folder

    def filesForSeries(self, series_uid: str, hits: int = -1) -> list[str]:
        rows = self._query("SELECT Filename FROM Images WHERE SeriesInstanceUID = ? ORDER BY Filename", series_uid)
        return [self._absolute(name) for (name,) in rows[:hits if hits > 0 else None]]

    def fileForInstance(self, sop_uid: str) -> str:
        rows = self._query("SELECT Filename FROM Images WHERE SOPInstanceUID = ?", sop_uid)
        return self._absolute(rows[0][0]) if rows else ""

    def instanceForFile(self, filename: str) -> str:
        import pydicom

        return str(pydicom.dcmread(filename, stop_before_pixels=True).SOPInstanceUID)


def load_series_as_slicer_does(files: list[str]):
    """DICOMScalarVolumePlugin: files sorted along the slice normal, loaded with the archetype reader."""
    import pydicom
    import slicer
    import vtk

    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    orientation = np.array(headers[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort([float(np.dot(normal, np.array(h.ImagePositionPatient, float))) for h in headers])
    names = vtk.vtkStringArray()
    for index in order:
        names.InsertNextValue(files[index])
    name = f"{headers[0].SeriesNumber}: {headers[0].SeriesDescription}"
    node = slicer.modules.volumes.logic().AddArchetypeScalarVolume(files[order[0]], name, 0, names)
    if node is None:
        raise RuntimeError(f"Slicer could not load the DICOM series of {files[0]}.")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(str(headers[index].SOPInstanceUID) for index in order))
    return node


def install_dicom(monkeypatch, database_file: Path | None):
    """``slicer.dicomDatabase`` over ``database_file`` (None: a closed one, as before a DICOM
    database folder was chosen) and ``DICOMLib.DICOMUtils`` with ``loadSeriesByUID``; returns that
    ``DICOMUtils``, whose ``calls`` lists the series UIDs each ``loadSeriesByUID`` call asked for."""
    import slicer

    database = DICOMDatabase(database_file)
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    utils = types.SimpleNamespace(calls=[])

    def loadSeriesByUID(seriesUIDs, messages=None, progressCallback=None):
        utils.calls.append(list(seriesUIDs))
        if not isinstance(seriesUIDs, list):
            raise ValueError("SeriesUIDs must contain a list")
        if not seriesUIDs:
            raise ValueError("No series UIDs given")
        if not slicer.dicomDatabase.isOpen:
            raise OSError("DICOM module or database cannot be accessed")
        file_lists = [slicer.dicomDatabase.filesForSeries(uid) for uid in seriesUIDs]
        return [load_series_as_slicer_does(files).GetID() for files in file_lists if files]

    utils.loadSeriesByUID = loadSeriesByUID
    monkeypatch.setitem(sys.modules, "DICOMLib", types.SimpleNamespace(DICOMUtils=utils))
    monkeypatch.setitem(sys.modules, "DICOMLib.DICOMUtils", utils)
    return utils
