"""DICOM export (``analyze --dicom``): SEG and SR read back against segmentation.json and
findings.json, on the TCIA series, a copy with reversed instance numbers and a NIfTI input;
dciodvfy finds no error; a failure leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import RAS_NIFTI, SHARED_DATA, TCIA_SERIES, require, write_oblique_permuted_copy
from typer.testing import CliRunner

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.cli import app
from COLIPRISlicerLib.io.volume import load_volume

pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed: pip install highdicom")
hd = pytest.importorskip("highdicom", reason="highdicom is not installed: pip install highdicom")

NIFTI_SMALL = SHARED_DATA / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
runner = CliRunner()


def analyze_with_dicom(scan, out, model_folder, *extra: str):
    result = runner.invoke(app, ["analyze", str(scan), "--model", str(model_folder), "--out", str(out),
                                 "--device", "cpu", "--no-heatmaps", "--dicom", *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tcia_out(tiny_model_folder, tmp_path_factory):
    return analyze_with_dicom(require(TCIA_SERIES), tmp_path_factory.mktemp("tcia") / "out", tiny_model_folder)


@pytest.fixture(scope="module")
def reversed_series(tmp_path_factory):
    """The TCIA series with InstanceNumber (and file names) running the other way."""
    folder = tmp_path_factory.mktemp("reversed")
    files = sorted(require(TCIA_SERIES).glob("*.dcm"))
    for file in files:
        dataset = pydicom.dcmread(file)
        dataset.InstanceNumber = len(files) + 1 - int(dataset.InstanceNumber)
        dataset.save_as(folder / f"1-{dataset.InstanceNumber:02d}.dcm")
    return folder


@pytest.fixture(scope="module")
def reversed_out(tiny_model_folder, reversed_series, tmp_path_factory):
    return analyze_with_dicom(reversed_series, tmp_path_factory.mktemp("reversed_out") / "out", tiny_model_folder)


@pytest.fixture(scope="module")
def nifti_out(tiny_model_folder, tmp_path_factory):
    return analyze_with_dicom(require(NIFTI_SMALL), tmp_path_factory.mktemp("nifti") / "out", tiny_model_folder)


def labelmap_ijk(out):
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz"))), (2, 1, 0))


def source_headers(folder):
    headers = [pydicom.dcmread(file, stop_before_pixels=True) for file in sorted(folder.glob("*.dcm"))]
    return {str(header.SOPInstanceUID): header for header in headers}


def assert_seg_matches(out, volume, sources: dict):
    """Frames on their source slices with the input's geometry; segments as in segmentation.json."""
    seg = hd.seg.segread(out / "dicom" / "segmentation.dcm")
    labels = json.loads((out / "segmentation.json").read_text())["labels"]
    first = next(iter(sources.values()))
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SegmentationType == "BINARY" and seg.ContentDescription.startswith("AI-generated")
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == [label["name"] for label in labels]
    for segment, label in zip(segments, labels):
        expected = (label["terminology"].get("type") or {"code": "404684003"})["code"]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == expected
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.TrackingID == f"label {label['value']}"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert "sha256=" in algorithm.AlgorithmParameters and algorithm.AlgorithmName == "tests/tiny-random"
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = geometry.spacing_of(volume.ijk_to_ras)
    pixel_spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    np.testing.assert_allclose(pixel_spacing, spacing[[1, 0]], atol=1e-5)
    _, _, direction = geometry.itk_from_ijk_to_ras(volume.ijk_to_ras)
    orientation = np.asarray(direction).reshape(3, 3)[:, :2].T.ravel()
    written = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(written, orientation, atol=1e-5)
    labelmap = labelmap_ijk(out)
    pixels = seg.pixel_array.reshape(-1, *labelmap.shape[1::-1])
    expected = {(number, k) for number, label in enumerate(labels, 1) for k in range(volume.shape[2])
                if (labelmap[:, :, k] == label["value"]).any()}  # empty frames are left out
    assert seg.NumberOfFrames == len(expected) > 0
    stored = set()
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-4)
        k = int(round(geometry.ras_to_ijk(volume.ijk_to_ras, geometry.FLIP_XY @ np.asarray(position))[2]))
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        np.testing.assert_array_equal(pixels[index], (labelmap[:, :, k] == labels[number - 1]["value"]).T)
        stored.add((number, k))
    assert stored == expected


def sr_groups(sr):
    """(tracking name, {concept meaning: item}) per measurement group of a TID 1500 SR."""
    containers = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"]
    measurements = next(c for c in containers if c.ConceptNameCodeSequence[0].CodeValue == "126010")
    for group in measurements.ContentSequence:
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group.ContentSequence}
        yield items["Tracking Identifier"].TextValue, items


def assert_sr_matches(out, sources: dict):
    sr = hd.sr.srread(out / "dicom" / "measurement_report.dcm")
    document = json.loads((out / "findings.json").read_text())
    first = next(iter(sources.values()))
    assert sr.StudyInstanceUID == first.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == first.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence} == set(sources)
    groups = list(sr_groups(sr))
    assert [name for name, _ in groups] == [finding["name"] for finding in document["findings"]]
    for (_, items), finding in zip(groups, document["findings"]):
        value = items["Probability"].MeasuredValueSequence[0]
        assert float(value.NumericValue) == pytest.approx(finding["likelihood"], abs=1e-12)
        threshold = items["Threshold Value"].MeasuredValueSequence[0]
        assert float(threshold.NumericValue) == pytest.approx(finding["threshold"], abs=1e-12)
        code = (finding["terminology"] or {"code": "404684003"})["code"]
        assert items["Finding"].ConceptCodeSequence[0].CodeValue == code
        evaluation = next(item for item in items.values()
                          if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == code)
        assert evaluation.ConceptCodeSequence[0].CodeMeaning == ("Present" if finding["present"] else "Absent")
        region = items["Image Region"]
        assert region.GraphicType == "POINT" and region.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
        peak_lps = np.asarray(finding["peak_ras"]) * [-1, -1, 1]
        np.testing.assert_allclose([float(v) for v in region.GraphicData], peak_lps, atol=0.006)
    parsed = sr.content.get_planar_roi_measurement_groups()  # highdicom's own TID 1500 reader agrees
    assert [group.tracking_identifier for group in parsed] == [finding["name"] for finding in document["findings"]]
    assert [group.get_measurements()[0].value for group in parsed] == [f["likelihood"] for f in document["findings"]]
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for container in sr.ContentSequence if container.ValueType == "CONTAINER"
             for item in container.get("ContentSequence", []) if item.ValueType == "TEXT"}
    assert texts["Comment"].startswith("Research use only, not for clinical decisions.")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert texts["Narrative Summary"].splitlines()[0] in report and "IMPRESSION" in texts["Narrative Summary"]


def test_tcia_seg_frames_lie_on_their_source_slices(tcia_out):
    assert_seg_matches(tcia_out, load_volume(TCIA_SERIES), source_headers(TCIA_SERIES))


def test_tcia_sr_holds_every_finding_of_findings_json(tcia_out):
    assert_sr_matches(tcia_out, source_headers(TCIA_SERIES))
    summary = json.loads((tcia_out / "dicom" / "dicom.json").read_text())
    assert summary["derived_from"] is None and not (tcia_out / "dicom" / "ct").exists()


def test_reversed_instance_numbers_change_nothing_but_the_references(reversed_series, reversed_out, tcia_out):
    volume = load_volume(reversed_series)
    original = load_volume(TCIA_SERIES).slices.instance_numbers
    assert volume.slices.instance_numbers == tuple(65 - number for number in original) != original
    assert_seg_matches(reversed_out, volume, source_headers(reversed_series))
    assert_sr_matches(reversed_out, source_headers(reversed_series))
    np.testing.assert_array_equal(labelmap_ijk(reversed_out), labelmap_ijk(tcia_out))


def test_nifti_input_gets_a_derived_ct_series_in_a_new_study(nifti_out):
    volume = load_volume(NIFTI_SMALL)
    derived = nifti_out / "dicom" / "ct"
    sources = source_headers(derived)
    assert len(sources) == volume.shape[2]
    first = next(iter(sources.values()))
    assert first.DerivationDescription.startswith('Converted from the non-DICOM file "example_ct_sm"')
    reread = load_volume(derived)
    np.testing.assert_allclose(reread.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(reread.array, np.rint(volume.array).astype(np.int16))
    assert_seg_matches(nifti_out, volume, sources)
    assert_sr_matches(nifti_out, sources)
    assert json.loads((nifti_out / "dicom" / "dicom.json").read_text())["derived_from"] == "example_ct_sm"


def dciodvfy_errors(path) -> list[str]:
    completed = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (completed.stdout + completed.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not found: apt-get install dicom3tools")
def test_dciodvfy_finds_no_error(tcia_out, nifti_out):
    paths = [out / "dicom" / name for out in (tcia_out, nifti_out)
             for name in ("segmentation.dcm", "measurement_report.dcm")]
    paths.append(sorted((nifti_out / "dicom" / "ct").glob("*.dcm"))[0])
    assert {str(path): dciodvfy_errors(path) for path in paths} == {str(path): [] for path in paths}


def test_a_failing_dicom_export_leaves_no_output(tiny_model_folder, tmp_path, monkeypatch):
    from COLIPRISlicerLib.export import dicom_sr

    real = dicom_sr.build_measurement_report

    def without_findings(findings, *args, **kwargs):  # fails inside the SR builder, after the SEG was written
        return real([], *args, **kwargs)

    monkeypatch.setattr(dicom_sr, "build_measurement_report", without_findings)
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(require(NIFTI_SMALL)), "--model", str(tiny_model_folder), "--out",
                                 str(out), "--device", "cpu", "--no-heatmaps", "--dicom"])
    assert result.exit_code == 1 and "No finding to report" in result.output
    assert not out.exists() or not [path.name for path in out.iterdir()]
    assert not [path.name for path in tmp_path.iterdir() if path.name != "out"]


def test_export_dicom_replaces_an_earlier_export_whole(tiny_engine, tmp_path):
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.export.dicom import export_dicom
    from COLIPRISlicerLib.segmentation.files import SegmentationResult

    analyzer = Analyzer(tiny_engine)
    result = analyzer.analyze(load_volume(require(NIFTI_SMALL)))
    (tmp_path / "dicom").mkdir()  # an earlier export: its dicom.json says the folder is ours
    (tmp_path / "dicom" / "stale.dcm").write_text("from an earlier export")
    (tmp_path / "dicom" / "dicom.json").write_text("{}")
    empty = SegmentationResult(np.zeros(result.volume.shape, np.int16), result.volume.ijk_to_ras, [], "zero-shot",
                               "zero-shot: no finding is above its threshold")
    folder = export_dicom(result, tmp_path, segmentation=empty, report_text=None)
    assert sorted(path.name for path in folder.iterdir()) == ["ct", "dicom.json", "measurement_report.dcm"]
    summary = json.loads((folder / "dicom.json").read_text())
    reason = "the segmentation has no label: zero-shot: no finding is above its threshold"
    assert summary["segmentation_skipped"] == reason
    assert not list(tmp_path.glob(".colipri-partial-*"))


def test_files_attached_in_any_order_are_matched_to_slices_by_position():
    from COLIPRISlicerLib.export.dicom_source import read_source_series, with_dicom_files
    from COLIPRISlicerLib.io.volume import Volume

    volume = load_volume(require(TCIA_SERIES))
    bare = Volume.from_array(volume.array, volume.ijk_to_ras, name="from Slicer")
    attached = with_dicom_files(bare, sorted(str(path) for path in TCIA_SERIES.glob("*.dcm"))[::-1])
    expected = [str(header.SOPInstanceUID) for header in read_source_series(volume).datasets]
    assert [str(header.SOPInstanceUID) for header in read_source_series(attached).datasets] == expected
    assert attached.content_hash() == bare.content_hash()


def test_derived_series_of_an_oblique_permuted_volume_keeps_every_voxel_in_place(tmp_path):
    from COLIPRISlicerLib.export.dicom_source import derived_source_series

    volume = load_volume(write_oblique_permuted_copy(require(NIFTI_SMALL), tmp_path / "oblique.nii.gz"))
    assert abs(volume.ijk_to_ras[0, 1]) > 1  # rotated 20 degrees and axes permuted
    source = derived_source_series(volume, tmp_path / "ct", derived_from="oblique")
    reread = load_volume(tmp_path / "ct")
    np.testing.assert_allclose(reread.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(reread.array, volume.array)
    assert [int(header.InstanceNumber) for header in source.datasets] == list(range(1, volume.shape[2] + 1))


def test_source_series_refuses_a_volume_without_dicom_files():
    from COLIPRISlicerLib.export.dicom_source import read_source_series

    with pytest.raises(ValueError, match="was not read from DICOM files; use derived_source_series"):
        read_source_series(load_volume(require(RAS_NIFTI)))


def test_source_series_refuses_files_off_the_volume_grid():
    from COLIPRISlicerLib.export.dicom_source import read_source_series
    from COLIPRISlicerLib.io.volume import Volume

    volume = load_volume(require(TCIA_SERIES))
    cropped = Volume.from_array(volume.array[:, :, 10:], volume.ijk_to_ras, name="cropped", slices=volume.slices)
    with pytest.raises(ValueError, match=r"lies on slice 54, outside the volume's slices 0\.\.53"):
        read_source_series(cropped)
    moved = np.array(volume.ijk_to_ras)
    moved[0, 3] += 0.4 * volume.spacing[0]  # origin 0.4 voxels to the right: no file lies on the grid
    shifted = Volume.from_array(volume.array, moved, name="shifted", slices=volume.slices)
    with pytest.raises(ValueError, match=r"lies 0\.40 voxels off the volume's slice grid"):
        read_source_series(shifted)


def test_segmentation_without_labels_is_refused_with_the_reason():
    from COLIPRISlicerLib.export.dicom_seg import build_segmentation
    from COLIPRISlicerLib.segmentation.files import SegmentationResult

    empty = SegmentationResult(np.zeros((2, 2, 2), np.int16), np.eye(4), [], "zero-shot", "nothing above threshold")
    with pytest.raises(ValueError, match="no label, so there is no segment to write"):
        build_segmentation(empty, None, None)


def test_head_labels_with_gaps_keep_their_values_names_and_codes(tmp_path):
    from COLIPRISlicerLib.export.dicom_seg import build_segmentation
    from COLIPRISlicerLib.export.dicom_source import Provenance, derived_source_series
    from COLIPRISlicerLib.segmentation.files import LabelInfo, SegmentationResult

    volume = load_volume(require(NIFTI_SMALL))
    labelmap = np.zeros(volume.shape, np.int16)
    labelmap[10:20, 30:40, 5:8] = 2
    labelmap[50:52, 60:61, 20] = 5
    heart = {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
             "type": {"scheme": "SCT", "code": "80891009", "meaning": "Heart"}}
    labels = [LabelInfo(2, "Heart", (0.8, 0.2, 0.2), heart), LabelInfo(5, "Spot", (0.1, 0.9, 0.1), {})]
    head = SegmentationResult(labelmap, volume.ijk_to_ras, labels, "head", "trained head, 2.5 mm")
    source = derived_source_series(volume, tmp_path / "ct", derived_from="example_ct_sm")
    provenance = Provenance("tests/head", "r1", "ab" * 32, "", "0.1.0")
    seg = build_segmentation(head, source, provenance)
    segments = seg.SegmentSequence
    assert [(s.SegmentLabel, s.TrackingID) for s in segments] == [("Heart", "label 2"), ("Spot", "label 5")]
    assert [s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in segments] == ["123037004", "85756007"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in segments] == ["80891009", "404684003"]
    counts = {1: 0, 2: 0}
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        counts[item.SegmentIdentificationSequence[0].ReferencedSegmentNumber] += int(frame.sum())
    assert counts == {1: 10 * 10 * 3, 2: 2}
