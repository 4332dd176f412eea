"""What a DICOM SEG and SR are made from: the source images and the model that produced them.

A volume read from a DICOM folder keeps its slice files (``Volume.slices.files``); their
headers are matched to the volume's slices by position, so frame ``k`` of a SEG is derived
from the file whose ImagePositionPatient is voxel ``(0, 0, k)``, whatever the file names or
instance numbers. A volume without slice files (NIfTI, NRRD, MHA, an array) has no DICOM
study to join: :func:`derived_source_series` writes it as a new CT series in a new study
(new UIDs, empty patient identity, a "derived from <file>" note), and the SEG and SR refer
to that series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.io.volume import Volume

#: Greatest distance (in voxels) between a file's ImagePositionPatient and its slice origin.
POSITION_TOLERANCE_VOXELS = 0.05
DERIVED_SERIES_NUMBER = 9001
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Stated in every SR (the SEG's ContentDescription says it in 64 characters), as in the README.
RESEARCH_STATEMENT = "Research use only, not for clinical decisions."


@dataclass(frozen=True)
class Provenance:
    """The model and software that made an analysis (from ``AnalysisResult.model``).

    Attributes:
        model_id: e.g. "microsoft/colipri" or a model folder's id.
        revision: pinned revision, or "unpinned".
        sha256: of the weights file.
        label: the model's warning label (e.g. "synthetic teaching model - not COLIPRI ..."), or "".
        project_version: COLIPRISlicer's version.
    """

    model_id: str
    revision: str
    sha256: str
    label: str
    project_version: str

    @classmethod
    def from_model(cls, model: dict) -> Provenance:
        from COLIPRISlicerLib import __version__

        return cls(str(model["model_id"]), str(model.get("revision") or "unpinned"), str(model["sha256"]),
                   str(model.get("label") or ""), __version__)

    @property
    def software_version(self) -> str:
        return f"COLIPRISlicer {self.project_version}"

    @property
    def statement(self) -> str:
        """The research-use statement, with the model's own warning label when it has one."""
        return f"{RESEARCH_STATEMENT} Model: {self.model_id} ({self.label})." if self.label else RESEARCH_STATEMENT

    def algorithm_parameters(self) -> dict[str, str]:
        return {"model_id": self.model_id, "revision": self.revision, "sha256": self.sha256,
                "software": self.software_version}


@dataclass(frozen=True)
class SourceSeries:
    """Source image headers, one per volume slice ``k`` (PixelData not loaded).

    Attributes:
        datasets: pydicom datasets; ``datasets[k]`` holds the slice at voxel index k.
        derived_from: None for a DICOM input; else the input's name, for the derived series.
    """

    datasets: tuple
    derived_from: str | None = None

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)


def read_source_series(volume: Volume) -> SourceSeries:
    """Headers of the DICOM files a volume was read from, ordered by slice index.

    Raises:
        ValueError: If the volume has no slice files, or the files do not lie one per slice
            on the volume's grid (e.g. a tilted or irregular series).
    """
    import pydicom

    files = volume.slices.files if volume.slices is not None else ()
    if not files:
        message = f'Volume "{volume.name}" was not read from DICOM files; use derived_source_series() for it.'
        raise ValueError(message)
    by_slice: dict[int, object] = {}
    for file in files:
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
        k = _slice_index(dataset, volume, file)
        if k in by_slice:
            message = f'Two files of "{volume.name}" lie on slice {k} (one is "{file}"); keep one series per folder.'
            raise ValueError(message)
        by_slice[k] = dataset
    missing = sorted(set(range(volume.shape[2])) - set(by_slice))
    if missing:
        raise ValueError(f'No DICOM file of "{volume.name}" lies on slice(s) {missing[:5]}; reload the whole series.')
    return SourceSeries(tuple(by_slice[k] for k in range(volume.shape[2])))


def with_dicom_files(volume: Volume, files: list[str]) -> Volume:
    """The volume with the DICOM files it was loaded from, in any order (e.g. from Slicer's
    ``DICOM.instanceUIDs`` attribute and ``slicer.dicomDatabase.fileForInstance``), so that
    its export joins their study; :func:`read_source_series` matches them to slices by position."""
    from dataclasses import replace

    from COLIPRISlicerLib.io.volume import SliceMetadata

    numbers = volume.slices.instance_numbers if volume.slices is not None else (None,) * len(files)
    return replace(volume, slices=SliceMetadata(tuple(numbers), files=tuple(str(file) for file in files)), _hash=[])


def _slice_index(dataset, volume: Volume, file: str) -> int:
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    if (columns, rows) != volume.shape[:2]:
        message = (f'"{file}" has {columns} x {rows} pixels but the volume slices are {volume.shape[0]} x'
                   f" {volume.shape[1]}; the file is not part of this volume's series.")
        raise ValueError(message)
    position_ras = geometry.FLIP_XY @ np.asarray(dataset.ImagePositionPatient, dtype=float)
    index = geometry.ras_to_ijk(volume.ijk_to_ras, position_ras[None])[0]
    k = int(round(index[2]))
    offset = np.abs(index - (0, 0, k)).max()
    if offset > POSITION_TOLERANCE_VOXELS:
        message = (f'"{file}" lies {offset:.2f} voxels off the volume\'s slice grid'
                   f" (voxel {np.round(index, 2).tolist()});"
                   " DICOM export needs an untilted series with one file per slice.")
        raise ValueError(message)
    if not 0 <= k < volume.shape[2]:
        message = (f'"{file}" lies on slice {k}, outside the volume\'s slices 0..{volume.shape[2] - 1}: the volume'
                   " is not the whole series in its folder. Analyse the whole series.")
        raise ValueError(message)
    return k


def derived_source_series(volume: Volume, folder: Path, *, derived_from: str) -> SourceSeries:
    """Write ``volume`` as a new CT series (new study) into ``folder``; return its headers.

    Voxel values are rounded to integer HU (int16). Patient name and ID are left empty:
    the input carried none.

    Args:
        volume: the analysed volume.
        folder: where to write ``CT_<k>.dcm`` (created).
        derived_from: the input's name, recorded in DerivationDescription and ImageComments.
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    _, spacing, direction_lps = geometry.itk_from_ijk_to_ras(volume.ijk_to_ras)
    direction = np.asarray(direction_lps).reshape(3, 3)
    shared = _derived_header(volume, derived_from, generate_uid(), generate_uid(), generate_uid())
    shared.ImageOrientationPatient = [round(float(v), 8) for v in direction[:, :2].T.ravel()]
    shared.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]
    shared.SliceThickness = round(float(spacing[2]), 6)
    values = np.clip(np.rint(volume.array), -32768, 32767).astype(np.int16)
    datasets = []
    for k in range(volume.shape[2]):
        position_lps = geometry.FLIP_XY @ geometry.ijk_to_ras(volume.ijk_to_ras, np.array([0.0, 0.0, k]))
        dataset = _derived_slice(shared, values[:, :, k], k, position_lps)
        dataset.save_as(folder / f"CT_{k + 1:04d}.dcm", enforce_file_format=True)
        del dataset.PixelData  # the SEG and SR need headers only
        datasets.append(dataset)
    return SourceSeries(tuple(datasets), derived_from)


def _derived_header(volume: Volume, derived_from: str, study_uid: str, series_uid: str, frame_uid: str):
    from datetime import datetime

    from pydicom.dataset import Dataset

    from COLIPRISlicerLib import __version__

    header = Dataset()
    header.SpecificCharacterSet, header.SOPClassUID = "ISO_IR 192", CT_IMAGE_STORAGE
    header.PatientName, header.PatientID, header.PatientBirthDate, header.PatientSex = "", "", "", ""
    header.StudyInstanceUID, header.StudyID, header.AccessionNumber = study_uid, "COLIPRI", ""
    now = datetime.now()  # the derived study is created now; the input's date is unknown
    header.StudyDate, header.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    header.ReferringPhysicianName = ""
    header.Modality, header.SeriesInstanceUID, header.SeriesNumber = "CT", series_uid, DERIVED_SERIES_NUMBER
    header.Laterality, header.PatientPosition = "", ""  # Type 2: unknown for a non-DICOM input
    header.SeriesDescription = f"Derived from {derived_from}"[:64]
    header.FrameOfReferenceUID, header.PositionReferenceIndicator = frame_uid, ""
    header.Manufacturer, header.SoftwareVersions = "COLIPRISlicer", f"COLIPRISlicer {__version__}"
    header.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    header.DerivationDescription = f'Converted from the non-DICOM file "{derived_from}"; values rounded to integer HU'
    header.ImageComments = f'Derived from "{derived_from}" by COLIPRISlicer: no original DICOM study exists.'
    header.SamplesPerPixel, header.PhotometricInterpretation = 1, "MONOCHROME2"
    header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 16, 16, 15, 1
    header.RescaleIntercept, header.RescaleSlope, header.RescaleType = 0, 1, "HU"
    header.KVP, header.AcquisitionNumber = "", ""
    header.Rows, header.Columns = volume.shape[1], volume.shape[0]
    return header


def _derived_slice(shared, values_ij: np.ndarray, k: int, position_lps: np.ndarray):
    from copy import deepcopy

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dataset = deepcopy(shared)
    dataset.SOPInstanceUID = generate_uid()
    dataset.InstanceNumber = k + 1
    dataset.ImagePositionPatient = [round(float(v), 6) for v in position_lps]
    dataset.PixelData = np.ascontiguousarray(values_ij.T).tobytes()  # rows along J, columns along I
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset
