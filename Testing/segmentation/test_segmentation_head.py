"""Segmentation head (segmentation/head.py, segmentation/files.py, segmentation/data.py,
segmentation/training.py): training on generated spheres, geometry of the labelmap, head
files, errors, and the zero-shot fallback."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import RAS_NIFTI, TCIA_SERIES, require

SPHERE_LABELS = {1: "Sphere"}


TRAINING_OPTIONS = {"base_channels": 8, "learning_rate": 1e-2, "progress": False, "label_names": SPHERE_LABELS}


@pytest.fixture(scope="module")
def small_training(tiny_model_folder, tmp_path_factory):
    """Two generated sphere volumes (one to train, one to validate): one epoch, then a
    resumed call with a new engine up to two."""
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.segmentation.data import make_sphere_dataset
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    root = tmp_path_factory.mktemp("spheres")
    images, labels = make_sphere_dataset(root / "train", 2, seed=0)
    out = root / "head"
    first = train_segmentation_head(images, labels, Engine(str(tiny_model_folder), device="cpu", precision="fp32"),
                                    out, epochs=1, **TRAINING_OPTIONS)
    engine = Engine(str(tiny_model_folder), device="cpu", precision="fp32")
    second = train_segmentation_head(images, labels, engine, out, epochs=2, **TRAINING_OPTIONS)
    return {"first": first, "second": second, "engine": engine, "out": out, "root": root}


@pytest.fixture(scope="module")
def random_head(tiny_engine, sphere_volume):
    """An untrained head for the tiny model whose output bias makes it say "label 1" everywhere."""
    import torch

    from COLIPRISlicerLib.segmentation.head import create_head

    encoding = tiny_engine.encode(sphere_volume)
    torch.manual_seed(0)
    head = create_head(tiny_engine, encoding.grid, encoding.features.shape[0], [0, 1], SPHERE_LABELS, base_channels=4)
    with torch.no_grad():
        head.network.output.conv.conv.bias.copy_(torch.tensor([-1e4, 1e4]))
    return head


@pytest.fixture(scope="module")
def sphere_volume(tmp_path_factory):
    from COLIPRISlicerLib.segmentation.data import make_sphere_dataset
    from COLIPRISlicerLib.io.volume import load_volume

    images, _ = make_sphere_dataset(tmp_path_factory.mktemp("one_sphere"), 1, seed=7)
    return load_volume(images / "sphere_000.nii.gz")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.mark.slow
def test_head_trained_on_ten_sphere_volumes_reaches_dice_0_7_on_an_unseen_volume(tiny_model_folder, tmp_path):
    """30-45 s on 2 idle CPU cores, several minutes on busy ones: see bench/bench_segmentation_head.py."""
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.segmentation.data import read_label
    from COLIPRISlicerLib.segmentation.head import predict
    from COLIPRISlicerLib.segmentation.head import load_head
    from COLIPRISlicerLib.segmentation.data import make_sphere_dataset
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head
    from COLIPRISlicerLib.io.volume import load_volume

    engine = Engine(str(tiny_model_folder), device="cpu", precision="fp32")
    images, labels = make_sphere_dataset(tmp_path / "train", 10, seed=0)
    summary = train_segmentation_head(images, labels, engine, tmp_path / "head", epochs=2, **TRAINING_OPTIONS)
    images, labels = make_sphere_dataset(tmp_path / "unseen", 1, seed=12345)
    volume = load_volume(images / "sphere_000.nii.gz")
    truth, _ = read_label(labels / "sphere_000.nii.gz")
    result = predict(load_head(tmp_path / "head", engine), engine.encode(volume), volume)
    assert (len(summary.train_cases), len(summary.validation_cases)) == (8, 2)
    assert result.labelmap.dtype == np.int16 and set(np.unique(result.labelmap)) <= {0, 1}
    assert dice(result.labelmap == 1, truth == 1) >= 0.7
    assert result.source == "head" and [label.name for label in result.labels] == ["Sphere"]


def test_resumed_training_continues_the_epoch_count_without_re_encoding(small_training):
    first, second = small_training["first"], small_training["second"]
    assert (first.epochs_completed, first.resumed_from_epoch, first.encoded_volumes) == (1, 0, 2)
    assert (second.epochs_completed, second.resumed_from_epoch, second.encoded_volumes) == (2, 1, 0)
    assert [entry["epoch"] for entry in second.history] == [1, 2]
    assert second.history[0] == first.history[0]
    assert (len(first.train_cases), len(first.validation_cases)) == (1, 1)
    assert len(list((small_training["out"] / "feature_cache").glob("*.safetensors"))) == 2


def copy_of_head_folder(small_training, tmp_path):
    return shutil.copytree(small_training["out"], tmp_path / "head")


def train_again(small_training, out, **options):
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    root = small_training["root"] / "train"
    options = {**TRAINING_OPTIONS, **options}
    return train_segmentation_head(root / "images", root / "labels", small_training["engine"], out, **options)


def test_max_minutes_stops_after_the_epoch_that_used_up_the_budget(small_training, tmp_path):
    summary = train_again(small_training, copy_of_head_folder(small_training, tmp_path), epochs=5,
                          max_minutes=1e-6)
    assert (summary.resumed_from_epoch, summary.epochs_completed, summary.stopped_by_time) == (2, 3, True)
    assert json.loads((tmp_path / "head" / "head.json").read_text())["training"]["epochs"] == 3


def test_resuming_refuses_a_checkpoint_of_another_training_setup(small_training, tmp_path):
    with pytest.raises(ValueError, match=r"belongs to another training run \(learning_rate differ\)"):
        train_again(small_training, copy_of_head_folder(small_training, tmp_path), epochs=3, learning_rate=1e-3)


def test_training_refuses_zero_epochs(small_training, tmp_path):
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        train_again(small_training, tmp_path / "head", epochs=0)


def test_head_json_records_encoder_labels_preprocessing_and_validation_dice(small_training):
    metadata = json.loads((small_training["out"] / "head.json").read_text())
    identity = small_training["engine"].identity
    assert metadata["encoder"] == {"model_id": identity.model_id, "revision": None, "sha256": identity.sha256}
    assert metadata["labels"][0]["value"] == 1 and metadata["labels"][0]["name"] == "Sphere"
    assert metadata["preprocessing"] == {"model_shape": [64] * 3, "patch_size": [8] * 3, "spacing_mm": [6.0] * 3,
                                        "refine": 1}
    assert metadata["architecture"]["patch_size"] == 8 and metadata["architecture"]["base_channels"] == 8
    assert metadata["training"]["epochs"] == 2 and len(metadata["training"]["validation_cases"]) == 1
    assert metadata["validation_dice"]["Sphere"] == small_training["second"].history[-1]["dice"][0]
    assert 0.0 <= metadata["validation_dice"]["Sphere"] <= 1.0


def inside_model_field_of_view(grid, volume) -> np.ndarray:
    """Voxels whose centre lies within the model grid's extent (half a voxel beyond the centres)."""
    from COLIPRISlicerLib.geometry import apply_affine

    indices = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    model_index = apply_affine(np.linalg.inv(grid.model_to_ras) @ volume.ijk_to_ras, indices)
    return ((model_index >= -0.5) & (model_index <= np.asarray(grid.model_shape) - 0.5)).all(axis=-1)


def read_input_with_sitk(path):
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


@pytest.mark.filterwarnings("ignore:The field of view:RuntimeWarning")
@pytest.mark.parametrize("path", [TCIA_SERIES, RAS_NIFTI], ids=["tcia_dicom", "ras_nifti"])
def test_labelmap_and_written_file_have_exactly_the_input_geometry(path, tiny_engine, random_head, tmp_path):
    import SimpleITK as sitk

    from COLIPRISlicerLib.segmentation.head import predict
    from COLIPRISlicerLib.segmentation.files import write_segmentation
    from COLIPRISlicerLib.io.volume import load_volume

    volume = load_volume(require(path))
    encoding = tiny_engine.encode(volume)
    result = predict(random_head, encoding, volume)
    assert result.labelmap.shape == volume.shape and result.labelmap.dtype == np.int16
    np.testing.assert_array_equal(result.ijk_to_ras, volume.ijk_to_ras)
    np.testing.assert_array_equal(result.labelmap == 1, inside_model_field_of_view(encoding.grid, volume))
    image_path, json_path = write_segmentation(result, volume, tmp_path)
    written, original = sitk.ReadImage(str(image_path)), read_input_with_sitk(path)
    assert written.GetSize() == original.GetSize()
    # NIfTI stores the geometry as float32: equal to the input up to float32 rounding.
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(written), (2, 1, 0)), result.labelmap)
    assert json.loads(json_path.read_text())["labels"][0]["name"] == "Sphere"


def test_segmentation_json_maps_values_to_names_colours_terminology_and_source(random_head, tiny_engine, sphere_volume):
    from COLIPRISlicerLib.segmentation.head import predict

    result = predict(random_head, tiny_engine.encode(sphere_volume), sphere_volume)
    data = json.loads(result.to_json())
    assert data["source"] == "head" and data["background_value"] == 0
    assert data["description"] == "segmentation head, 6 mm grid"
    label = data["labels"][0]
    assert (label["value"], label["name"], label["colour"]) == (1, "Sphere", [0.9, 0.3, 0.25])
    assert label["terminology"]["category"] == {"scheme": "SCT", "code": "85756007", "meaning": "Tissue"}
    assert data["metadata"]["encoder"]["sha256"] == tiny_engine.identity.sha256


def saved_head(head, folder):
    from COLIPRISlicerLib.segmentation.files import save_head

    return save_head(head, folder)


def test_load_head_refuses_a_head_trained_on_another_encoder(random_head, tiny_engine, tmp_path):
    from COLIPRISlicerLib.segmentation.head import SegmentationHead
    from COLIPRISlicerLib.segmentation.head import load_head

    other = dataclasses.replace(random_head.metadata, encoder={"model_id": "other/model", "sha256": "ab" * 32})
    folder = saved_head(SegmentationHead(random_head.network, other), tmp_path / "head")
    expected = f"other/model \\(sha256 {'ab' * 32}\\).*tests/tiny-random \\(sha256 {tiny_engine.identity.sha256}\\)"
    with pytest.raises(RuntimeError, match=expected):
        load_head(folder, tiny_engine)


def test_load_head_round_trips_weights_and_labels(random_head, tiny_engine, tmp_path):
    import torch

    from COLIPRISlicerLib.segmentation.head import load_head

    loaded = load_head(saved_head(random_head, tmp_path / "head"), tiny_engine)
    assert loaded.labels == random_head.labels
    for name, tensor in random_head.network.state_dict().items():
        torch.testing.assert_close(loaded.network.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        ("weights_garbage", RuntimeError, "head.safetensors.*corrupt or incomplete"),
        ("weights_missing", FileNotFoundError, "head.safetensors.*not found"),
        ("json_garbage", RuntimeError, "head.json.*is corrupt"),
        ("json_incomplete", RuntimeError, "lacks \\['encoder'\\]"),
    ],
)
def test_load_head_reports_corrupt_or_missing_files(damage, error, match, random_head, tiny_engine, tmp_path):
    from COLIPRISlicerLib.segmentation.head import load_head

    folder = saved_head(random_head, tmp_path / "head")
    if damage == "weights_garbage":
        (folder / "head.safetensors").write_bytes(b"\x00not a safetensors file")
    elif damage == "weights_missing":
        (folder / "head.safetensors").unlink()
    elif damage == "json_garbage":
        (folder / "head.json").write_text("{truncated")
    else:
        metadata = json.loads((folder / "head.json").read_text())
        del metadata["encoder"]
        (folder / "head.json").write_text(json.dumps(metadata))
    with pytest.raises(error, match=match):
        load_head(folder, tiny_engine)


@pytest.fixture
def one_case(tmp_path):
    from COLIPRISlicerLib.segmentation.data import make_sphere_dataset

    return make_sphere_dataset(tmp_path / "data", 1, seed=3)


def write_label_like(path, array, ijk_to_ras):
    import SimpleITK as sitk

    from COLIPRISlicerLib.geometry import array_to_sitk

    sitk.WriteImage(array_to_sitk(array.astype(np.int16), ijk_to_ras), str(path))


def test_training_refuses_a_label_of_another_size(one_case, tiny_engine, tmp_path):
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    images, labels = one_case
    write_label_like(labels / "sphere_000.nii.gz", np.zeros((64, 64, 60)), np.diag([6.0, 6.0, 6.0, 1.0]))
    with pytest.raises(ValueError, match=r"has size \(64, 64, 60\) but image .* has size \(64, 64, 64\)"):
        train_segmentation_head(images, labels, tiny_engine, tmp_path / "out", epochs=1, progress=False)


def test_training_refuses_a_label_elsewhere_in_space(one_case, tiny_engine, tmp_path):
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    images, labels = one_case
    write_label_like(labels / "sphere_000.nii.gz", np.zeros((64, 64, 64)), np.diag([6.0, 6.0, 6.0, 1.0]))
    with pytest.raises(ValueError, match="lies elsewhere in space"):
        train_segmentation_head(images, labels, tiny_engine, tmp_path / "out", epochs=1, progress=False)


def test_training_refuses_an_empty_label_folder(one_case, tiny_engine, tmp_path):
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    images, labels = one_case
    shutil.rmtree(labels)
    labels.mkdir()
    with pytest.raises(ValueError, match='Labels folder ".*" holds no NIfTI/NRRD/MHA files'):
        train_segmentation_head(images, labels, tiny_engine, tmp_path / "out", progress=False)


def test_training_refuses_folders_without_matching_names(one_case, tiny_engine, tmp_path):
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    images, labels = one_case
    (labels / "sphere_000.nii.gz").rename(labels / "other_case.nii.gz")
    with pytest.raises(ValueError, match="No image in .* has a label file of the same name"):
        train_segmentation_head(images, labels, tiny_engine, tmp_path / "out", progress=False)


def test_training_reports_a_missing_folder(tiny_engine, tmp_path):
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    with pytest.raises(FileNotFoundError, match="Images folder not found"):
        train_segmentation_head(tmp_path / "absent", tmp_path, tiny_engine, tmp_path / "out", progress=False)


def test_cli_command_raises_a_user_error_that_names_the_empty_folder(tiny_model_folder, tmp_path):
    from COLIPRISlicerLib.cli.segmentation import train_seg_head_command

    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=f'Images folder "{tmp_path / "images"}" holds no NIfTI'):
        train_seg_head_command(tmp_path / "images", tmp_path, str(tiny_model_folder), tmp_path / "out", device="cpu")


def test_label_files_pair_with_nnunet_channel_suffix_and_other_formats(tmp_path):
    from COLIPRISlicerLib.segmentation.data import find_training_cases

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a_0000.nii.gz", "b.nrrd", "c.nii"):
        (tmp_path / "images" / name).touch()
    for name in ("a.nii.gz", "b.nii.gz", "notes.txt"):
        (tmp_path / "labels" / name).touch()
    cases = find_training_cases(tmp_path / "images", tmp_path / "labels")
    assert [(case.name, case.image_path.name, case.label_path.name) for case in cases] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"), ("b", "b.nrrd", "b.nii.gz")]


@pytest.mark.parametrize("patch", [2, 4, 16])
def test_decoder_upsamples_by_any_power_of_two_patch_size(patch):
    import torch

    from COLIPRISlicerLib.segmentation.head import HeadConfig, SegmentationDecoder

    decoder = SegmentationDecoder(HeadConfig(in_channels=12, num_classes=3, patch_size=patch, base_channels=2))
    logits = decoder(torch.zeros(1, 12, 2, 3, 2), torch.zeros(1, 1, 2 * patch, 3 * patch, 2 * patch))
    assert tuple(logits.shape) == (1, 3, 2 * patch, 3 * patch, 2 * patch)
    assert len(decoder.up_blocks) == int(np.log2(patch))


def test_head_config_refuses_a_patch_size_that_is_not_a_power_of_two():
    from COLIPRISlicerLib.segmentation.head import HeadConfig

    with pytest.raises(ValueError, match="power of two >= 2, got 6"):
        HeadConfig(in_channels=8, num_classes=2, patch_size=6)


def test_predict_refuses_features_of_another_encoder(random_head, tiny_engine, sphere_volume):
    import torch

    from COLIPRISlicerLib.segmentation.head import predict

    encoding = tiny_engine.encode(sphere_volume)
    wrong = dataclasses.replace(encoding, features=torch.zeros(7, *encoding.features.shape[1:]))
    with pytest.raises(ValueError, match=r"Expected features \(C=48, gx, gy, gz\), got \(7, 8, 8, 8\)"):
        predict(random_head, wrong, sphere_volume)


def small_grid(model_size: int = 64, spacing: float = 6.0, patch: int = 8):
    from COLIPRISlicerLib.geometry import PatchGrid

    model_to_ras = np.diag([spacing] * 3 + [1.0])
    model_to_ras[:3, 3] = -(model_size - 1) * spacing / 2
    return PatchGrid((model_size,) * 3, model_to_ras, (patch,) * 3)


def oblique_volume():
    """An anisotropic, rotated 80 x 70 x 40 volume (3 x 4 x 7 mm) centred on the model grid."""
    from COLIPRISlicerLib.io.volume import Volume

    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag([3.0, 4.0, 7.0])
    ijk_to_ras[:3, 3] = -ijk_to_ras[:3, :3] @ (np.array([80, 70, 40]) - 1) / 2
    array = np.full((80, 70, 40), -1000, dtype=np.int16)
    array[30:50, 30:40, 10:30] = 40
    return Volume.from_array(array, ijk_to_ras)


def voxel_distances_mm(volume, point_ras) -> np.ndarray:
    from COLIPRISlicerLib.geometry import apply_affine

    indices = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    return np.linalg.norm(apply_affine(volume.ijk_to_ras, indices) - point_ras, axis=-1)


def test_zero_shot_labels_the_voxels_around_the_hot_patch(tmp_path):
    from COLIPRISlicerLib.segmentation.head import zero_shot_segmentation
    from COLIPRISlicerLib.segmentation.files import write_segmentation

    grid, volume = small_grid(), oblique_volume()
    logits = np.full(grid.shape, -4.0, dtype=np.float32)
    logits[3, 5, 4] = 4.0
    result = zero_shot_segmentation({"Nodule": logits}, grid, volume, colours={"Nodule": (1.0, 0.0, 0.0)})
    distance = voxel_distances_mm(volume, grid.centres_ras()[3, 5, 4])
    assert (result.labelmap[distance < 12.0] == 1).all()  # a quarter of a 48 mm patch
    assert (result.labelmap[distance > 72.0] == 0).all()  # beyond 1.5 patches
    assert result.labelmap.shape == volume.shape
    np.testing.assert_array_equal(result.ijk_to_ras, volume.ijk_to_ras)
    assert (result.source, result.description) == ("zero-shot", "zero-shot, 48 mm resolution")
    assert result.labels[0].colour == (1.0, 0.0, 0.0)
    assert json.loads(write_segmentation(result, volume, tmp_path)[1].read_text())["labels"][0]["name"] == "Nodule"


def test_zero_shot_picks_the_finding_with_the_highest_logit_above_the_threshold():
    from COLIPRISlicerLib.segmentation.head import zero_shot_segmentation

    grid, volume = small_grid(), oblique_volume()
    weak, strong = np.full(grid.shape, 1.0, np.float32), np.full(grid.shape, -1.0, np.float32)
    strong[3, 5, 4] = 3.0
    result = zero_shot_segmentation({"Weak": weak, "Strong": strong}, grid, volume, threshold=0.5, linear=False)
    distance = voxel_distances_mm(volume, grid.centres_ras()[3, 5, 4])
    assert (result.labelmap[distance < 20.0] == 2).all()  # inside the hot 48 mm patch
    assert (result.labelmap[distance > 42.0] == 1).all()  # beyond its corners: the weak finding
    assert (zero_shot_segmentation({"Weak": weak}, grid, volume, threshold=1.0).labelmap == 0).all()
    assert [label.value for label in result.labels] == [1, 2]


def test_zero_shot_description_comes_from_the_grid_16_mm_for_colipri():
    from COLIPRISlicerLib.segmentation.head import zero_shot_segmentation

    grid, volume = small_grid(model_size=192, spacing=2.0), oblique_volume()
    result = zero_shot_segmentation({"Nodule": np.zeros(grid.shape, np.float32)}, grid, volume)
    assert result.description == "zero-shot, 16 mm resolution"


def test_zero_shot_refuses_a_map_off_the_patch_grid():
    from COLIPRISlicerLib.segmentation.head import zero_shot_segmentation

    with pytest.raises(ValueError, match=r'"Nodule" has shape \(4, 4, 4\), expected the patch grid \(8, 8, 8\)'):
        zero_shot_segmentation({"Nodule": np.zeros((4, 4, 4))}, small_grid(), oblique_volume())


def test_random_patch_crop_keeps_features_and_voxels_of_the_same_patches_and_finds_the_foreground():
    import torch

    from COLIPRISlicerLib.segmentation.sampling import random_patch_crop

    features = torch.arange(5 * 6 * 4, dtype=torch.float32).reshape(1, 5, 6, 4).expand(3, 5, 6, 4)
    # every voxel holds the number of the patch it lies in (patch size 4)
    image = features[:1].repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    target = torch.zeros(1, 20, 24, 16, dtype=torch.long)
    target[0, 17, 2, 13] = 2  # one foreground voxel in patch (4, 0, 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        f, i, t = random_patch_crop(features, image, target, 3, rng, foreground_share=1.0)
        assert tuple(f.shape) == (3, 3, 3, 3) and tuple(i.shape) == tuple(t.shape) == (1, 12, 12, 12)
        assert torch.equal(i[0, ::4, ::4, ::4], f[0]) and torch.equal(i[0, 3::4, 3::4, 3::4], f[0])
        assert int(t.sum()) == 2
    cropped_axis = random_patch_crop(features, image, target, 5, rng)[0]
    assert tuple(cropped_axis.shape) == (3, 5, 5, 4)  # an axis shorter than the crop is kept whole
    starts = {int(random_patch_crop(features, image, target, 3, rng, foreground_share=0.0)[0][0, 0, 0, 0])
              for _ in range(60)}
    assert len(starts) > 6  # without the foreground pull, crops start anywhere


def test_training_on_crops_feeds_crops_records_them_and_keeps_the_checkpoint_setup_apart(small_training, tmp_path,
                                                                                         monkeypatch):
    from COLIPRISlicerLib.segmentation import training as segmentation_training

    shapes = []
    crop = segmentation_training.random_patch_crop

    def recording_crop(*args, **kwargs):
        cropped = crop(*args, **kwargs)
        shapes.append(tuple(cropped[1].shape))
        return cropped

    monkeypatch.setattr(segmentation_training, "random_patch_crop", recording_crop)
    summary = train_again(small_training, tmp_path / "head", epochs=1, crop_patches=2)
    metadata = json.loads((tmp_path / "head" / "head.json").read_text())
    assert summary.epochs_completed == 1 and metadata["training"]["augmentation"] == "random 2-patch crops"
    assert len(shapes) == len(summary.train_cases) and all(shape[1:] == shapes[0][1:] for shape in shapes)
    assert shapes[0][1] < metadata["preprocessing"]["model_shape"][0]
    with pytest.raises(ValueError, match=r"another training run \(crop_patches differ\)"):
        train_again(small_training, tmp_path / "head", epochs=2, crop_patches=3)
    with pytest.raises(ValueError, match="crop_patches must be None or at least 1, got 0"):
        train_again(small_training, tmp_path / "other", epochs=1, crop_patches=0)


def test_a_checkpoint_from_before_crops_and_rare_class_options_existed_still_resumes(small_training, tmp_path):
    import torch

    out = copy_of_head_folder(small_training, tmp_path)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("crop_patches", "balanced_crops", "rarity", "recall_epochs", "recall_weight"):
        del checkpoint["setup"][key]
    torch.save(checkpoint, out / "checkpoint.pt")
    summary = train_again(small_training, out, epochs=3)
    assert (summary.resumed_from_epoch, summary.epochs_completed) == (2, 3)


def test_a_new_run_starts_at_the_prior_of_its_training_cases_only(small_training, monkeypatch):
    from COLIPRISlicerLib.segmentation import training as segmentation_training
    from COLIPRISlicerLib.segmentation.data import cached_facts
    from COLIPRISlicerLib.segmentation.losses import class_frequencies
    from COLIPRISlicerLib.segmentation.recipe import HeadRecipe
    from COLIPRISlicerLib.segmentation.training import _TrainingRun

    monkeypatch.setattr(segmentation_training, "RARE_CLASS_PRIOR", 0.0)  # both spheres' shares are under 1 %

    paths = {path.name: path for path in (small_training["out"] / "feature_cache").glob("*.safetensors")}
    facts = {name: cached_facts(path) for name, path in paths.items()}
    first, second = sorted(paths)
    run = _TrainingRun.create(small_training["engine"], paths, facts, [first], [second], SPHERE_LABELS,
                              HeadRecipe(base_channels=2, learning_rate=1e-2, seed=0))
    prior = run.head.network.output.conv.conv.bias.softmax(0).tolist()
    assert prior == pytest.approx(class_frequencies([paths[first]], run.values).tolist(), abs=1e-6)
    assert prior != pytest.approx(class_frequencies([paths[second]], run.values).tolist(), abs=1e-4)


def test_output_layer_starts_at_the_class_prior_of_the_training_voxels(small_training):
    import torch

    from COLIPRISlicerLib.segmentation.data import load_cached
    from COLIPRISlicerLib.segmentation.head import HeadConfig, SegmentationDecoder
    from COLIPRISlicerLib.segmentation.losses import class_frequencies, set_output_prior

    paths = sorted((small_training["out"] / "feature_cache").glob("*.safetensors"))
    values = torch.tensor([0, 1], dtype=torch.int32)
    frequencies = class_frequencies(paths, values)
    targets = [load_cached(path, values, "cpu")[2] for path in paths]
    foreground = sum(int(t.sum()) for t in targets) / sum(t.numel() for t in targets)
    assert frequencies == pytest.approx([1 - foreground, foreground]) and 0 < foreground < 0.5
    decoder = SegmentationDecoder(HeadConfig(in_channels=4, num_classes=2, patch_size=2, base_channels=2))
    set_output_prior(decoder, np.array([0.99, 0.01]))
    assert decoder.output.conv.conv.bias.softmax(0).tolist() == pytest.approx([0.99, 0.01], abs=1e-6)
    set_output_prior(decoder, np.array([1.0, 0.0]))  # an absent class gets a finite, very negative bias
    assert decoder.output.conv.conv.bias[1].item() == pytest.approx(np.log(1e-6))
    set_output_prior(decoder, np.array([0.99999, 1e-5]), rare=0.01)  # a rare class starts at 1 %
    assert decoder.output.conv.conv.bias.tolist() == pytest.approx([np.log(0.99999), np.log(0.01)])
    set_output_prior(decoder, np.array([1.0, 0.0]), rare=0.01)  # but an absent one still at the floor
    assert decoder.output.conv.conv.bias[1].item() == pytest.approx(np.log(1e-6))


def test_a_label_absent_from_a_crop_adds_a_constant_dice_term_not_a_push_towards_nothing():
    import torch

    from COLIPRISlicerLib.segmentation.losses import head_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, 4)
    logits[:, 2] = -20.0  # label 2 is predicted nowhere, and is absent from the target
    target = (torch.rand(1, 1, 4, 4, 4) > 0.5).long()
    p = logits.softmax(dim=1)
    t1 = (target[:, 0] == 1).float()
    dice1 = 2 * (p[:, 1] * t1).sum() / (p[:, 1].sum() + t1.sum() + 1e-5)
    cross_entropy = torch.nn.functional.cross_entropy(logits, target[:, 0])
    expected = cross_entropy + ((1 - dice1) + 1.0) / 2  # label 2's Dice term is exactly 1
    assert float(head_loss()(logits, target)) == pytest.approx(float(expected), rel=1e-5)


# --- heads that decode on a subdivided model grid (HeadConfig.refine) ---------------------------


def test_head_config_refine_adds_one_upsampling_level_per_factor_of_two():
    import torch

    from COLIPRISlicerLib.segmentation.head import HeadConfig, SegmentationDecoder

    config = HeadConfig(in_channels=12, num_classes=3, patch_size=4, base_channels=2, refine=2)
    decoder = SegmentationDecoder(config)
    logits = decoder(torch.zeros(1, 12, 2, 3, 2), torch.zeros(1, 1, 16, 24, 16))
    assert (config.levels, config.image_stride, len(decoder.up_blocks)) == (3, 8, 3)
    assert tuple(logits.shape) == (1, 3, 16, 24, 16)
    with pytest.raises(ValueError, match="refine must be a power of two >= 1"):
        HeadConfig(in_channels=12, num_classes=3, patch_size=4, refine=3)


def ramp_volume(sphere_volume, hu_per_mm: float):
    """The sphere volume's grid holding HU = hu_per_mm * R (mm): trilinear interpolation reproduces it exactly."""
    from COLIPRISlicerLib.geometry import ijk_to_ras
    from COLIPRISlicerLib.io.volume import Volume

    indices = np.stack(np.meshgrid(*[np.arange(n) for n in sphere_volume.shape], indexing="ij"), axis=-1)
    r_mm = ijk_to_ras(sphere_volume.ijk_to_ras, indices.reshape(-1, 3))[:, 0].reshape(sphere_volume.shape)
    return Volume((hu_per_mm * r_mm).astype(np.float32), sphere_volume.ijk_to_ras, "ramp")


def test_resample_for_head_on_the_model_grid_equals_the_model_input(tiny_engine, sphere_volume):
    from COLIPRISlicerLib.preprocessing import resample_for_head

    encoding = tiny_engine.encode(sphere_volume)
    image = resample_for_head(sphere_volume, tiny_engine.loaded.image_transform, *encoding.grid.subdivided(1))
    assert tuple(image.shape) == tuple(encoding.image.shape)
    np.testing.assert_allclose(image.numpy(), encoding.image.numpy(), atol=1e-6)


def test_resample_for_head_on_the_subdivided_grid_is_the_clamped_rescaled_hu_at_each_fine_centre(
        tiny_engine, sphere_volume):
    """HU = 8 R mm runs past the clamp; each fine voxel holds clip(8 R, -1000, 1000) / 1000."""
    from COLIPRISlicerLib.geometry import apply_affine, ras_to_ijk
    from COLIPRISlicerLib.preprocessing import resample_for_head

    volume = ramp_volume(sphere_volume, 8.0)  # R spans +-189 mm: +-1512 HU
    shape, fine_to_ras = tiny_engine.encode(volume).grid.subdivided(2)
    image = resample_for_head(volume, tiny_engine.loaded.image_transform, shape, fine_to_ras)[0].numpy()
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    centres = apply_affine(fine_to_ras, indices)
    # beyond the outermost voxel centres (the last half voxel of the field of view) the edge value holds
    nearest_inside = apply_affine(volume.ijk_to_ras, np.clip(ras_to_ijk(volume.ijk_to_ras, centres), 0, 63))
    expected = np.clip(8.0 * nearest_inside[:, 0], -1000, 1000) / 1000
    assert tuple(shape) == (128, 128, 128) and (expected == 1).any() and (expected == -1).any()
    np.testing.assert_allclose(image.reshape(-1), expected, atol=1e-4)


@pytest.fixture(scope="module")
def refined_training(small_training, tmp_path_factory):
    """A head decoding on the model grid subdivided twice (3 mm for the 6 mm tiny model), one epoch."""
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    root, out = small_training["root"] / "train", tmp_path_factory.mktemp("refined") / "head"
    summary = train_segmentation_head(root / "images", root / "labels", small_training["engine"], out, epochs=1,
                                      refine=2, **TRAINING_OPTIONS)
    return {"summary": summary, "out": out, "engine": small_training["engine"]}


def test_refined_head_caches_image_and_target_on_the_subdivided_grid_and_records_it(refined_training, small_training):
    from safetensors.torch import load_file

    out = refined_training["out"]
    cached = [load_file(str(path)) for path in sorted((out / "feature_cache").glob("*.safetensors"))]
    assert [tuple(c["image"].shape) for c in cached] == [(1, 128, 128, 128)] * 2
    assert [tuple(c["target"].shape) for c in cached] == [(128, 128, 128)] * 2
    assert [tuple(c["features"].shape[1:]) for c in cached] == [(8, 8, 8)] * 2
    # sphere voxels on the 3 mm grid: 8x the count on the 6 mm grid, within the nearest-neighbour rounding
    coarse = [load_file(str(p))["target"].sum().item() for p in (small_training["out"] / "feature_cache").glob("*")]
    fine = sorted(c["target"].sum().item() for c in cached)
    np.testing.assert_allclose(fine, sorted(8 * n for n in coarse), rtol=0.05)
    metadata = json.loads((out / "head.json").read_text())
    assert metadata["architecture"]["refine"] == 2 and metadata["preprocessing"]["refine"] == 2
    assert metadata["training"]["dice_evaluated_on"].startswith("model grid subdivided 2x")


def test_refined_head_labels_the_input_grid_and_needs_the_processor_transform(refined_training, sphere_volume):
    from COLIPRISlicerLib.segmentation.head import predict
    from COLIPRISlicerLib.segmentation.head import load_head

    engine = refined_training["engine"]
    head = load_head(refined_training["out"], engine)
    encoding = engine.encode(sphere_volume)
    with pytest.raises(ValueError, match="2x finer grid than the model's and needs the processor's image transform"):
        predict(head, encoding, sphere_volume)
    result = predict(head, encoding, sphere_volume, engine.loaded.image_transform)
    assert result.labelmap.shape == sphere_volume.shape and result.labelmap.dtype == np.int16
    np.testing.assert_array_equal(result.ijk_to_ras, sphere_volume.ijk_to_ras)
    assert result.description == "segmentation head, 3 mm grid"


def test_balanced_crops_centre_a_one_voxel_class_beside_a_large_one_in_about_half_the_crops():
    import torch

    from COLIPRISlicerLib.segmentation.sampling import random_patch_crop

    features = torch.zeros(2, 8, 8, 8)
    image = torch.zeros(1, 32, 32, 32)
    target = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    target[0, :16] = 1  # half the grid
    target[0, 30, 30, 30] = 2  # one voxel, in the corner patch far from most of class 1

    def share_with_the_voxel(balanced: float, rarity: float = 0.0) -> float:
        rng = np.random.default_rng(0)
        crops = [random_patch_crop(features, image, target, 2, rng, foreground_share=1.0, balanced_share=balanced,
                                   rarity=rarity) for _ in range(400)]
        return float(np.mean([bool((t == 2).any()) for _, _, t in crops]))

    assert share_with_the_voxel(0.0) < 0.01
    assert 0.4 < share_with_the_voxel(1.0) < 0.6  # class 2 drawn half the time; then always in the crop
    # rarity 0.5: weights 1 (one voxel) against 16384 ** -0.5 = 1/128 (half the grid) -> 128/129 of the draws
    assert share_with_the_voxel(1.0, rarity=0.5) > 0.97


def test_class_balanced_cross_entropy_weighs_each_present_class_as_much_as_the_background():
    import torch
    from torch.nn.functional import cross_entropy

    from COLIPRISlicerLib.segmentation.losses import class_balanced_cross_entropy, head_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, 0, 0, :2] = 1  # 2 of 64 voxels; class 2 absent
    per_voxel = cross_entropy(logits, target[:, 0], reduction="none")[0]
    background, small = target[0, 0] == 0, target[0, 0] == 1
    expected = (per_voxel[background].mean() + per_voxel[small].mean()) / 2
    value = class_balanced_cross_entropy(logits, target)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    combined = head_loss(class_balanced_weight=0.1)(logits, target)
    plain = head_loss()(logits, target)
    assert float(combined.detach()) == pytest.approx(float((plain + 0.1 * expected).detach()), rel=1e-6)
    (gradient,) = torch.autograd.grad(value, logits)
    # per voxel: (p - onehot) / (2 present classes * that class's voxels): the 2 small-class voxels share the
    # weight the 62 background voxels share
    p = logits.softmax(dim=1)[0].detach()
    assert float(gradient[0, 1][small][0]) == pytest.approx(float(p[1][small][0] - 1) / (2 * 2), rel=1e-5)
    assert float(gradient[0, 1][background][0]) == pytest.approx(float(p[1][background][0]) / (2 * 62), rel=1e-5)


def test_recall_epochs_add_the_class_balanced_term_in_the_first_epochs_only(small_training, tmp_path, monkeypatch):
    from COLIPRISlicerLib.segmentation import losses as segmentation_losses
    from COLIPRISlicerLib.segmentation.recipe import RareClasses

    calls = []
    balanced = segmentation_losses.class_balanced_cross_entropy

    def counting(logits, target):
        calls.append(target.shape)
        return balanced(logits, target)

    monkeypatch.setattr(segmentation_losses, "class_balanced_cross_entropy", counting)
    rare = RareClasses(balanced_crops=0.5, rarity=0.5, recall_epochs=1)
    summary = train_again(small_training, tmp_path / "head", epochs=2, crop_patches=2, rare_classes=rare)
    assert len(calls) == len(summary.train_cases)  # every step of epoch 1, none of epoch 2
    training = json.loads((tmp_path / "head" / "head.json").read_text())["training"]
    assert training["loss"].endswith("plus 1 x class-balanced cross-entropy in the first 1 epochs")
    assert training["augmentation"] == ("random 2-patch crops, 50% of foreground centres class-balanced,"
                                        " drawn with weights voxels^-0.5")
    with pytest.raises(ValueError, match=r"another training run \(recall_epochs differ\)"):
        train_again(small_training, tmp_path / "head", epochs=3, crop_patches=2, rare_classes=RareClasses(0.5, 0.5, 2))
    with pytest.raises(ValueError, match="rarity >= 0"):
        RareClasses(rarity=-1)


def test_validate_every_skips_validation_between_and_always_validates_the_last_epoch(small_training, tmp_path):
    summary = train_again(small_training, tmp_path / "head", epochs=3, validate_every=2)
    assert [entry["dice"] is None for entry in summary.history] == [True, False, False]
    metadata = json.loads((tmp_path / "head" / "head.json").read_text())
    assert metadata["validation_dice"]["Sphere"] == summary.history[-1]["dice"][0]
    with pytest.raises(ValueError, match="validate_every >= 1"):
        train_again(small_training, tmp_path / "other", epochs=1, validate_every=0)


def test_a_training_run_starts_a_class_rarer_than_one_percent_at_one_percent(small_training):
    from COLIPRISlicerLib.segmentation.data import cached_facts
    from COLIPRISlicerLib.segmentation.losses import class_frequencies
    from COLIPRISlicerLib.segmentation.recipe import HeadRecipe
    from COLIPRISlicerLib.segmentation.training import _TrainingRun

    paths = {path.name: path for path in (small_training["out"] / "feature_cache").glob("*.safetensors")}
    facts = {name: cached_facts(path) for name, path in paths.items()}
    first, second = sorted(paths)
    run = _TrainingRun.create(small_training["engine"], paths, facts, [first], [second], SPHERE_LABELS,
                              HeadRecipe(base_channels=2, learning_rate=1e-2, seed=0))
    background, sphere = class_frequencies([paths[first]], run.values)
    assert sphere < 0.01  # a few spheres in a 384 mm field of view
    assert run.head.network.output.conv.conv.bias.tolist() == pytest.approx([np.log(background), np.log(0.01)])


def test_a_run_stopped_by_time_validates_its_last_epoch_even_between_validation_epochs(small_training, tmp_path):
    summary = train_again(small_training, tmp_path / "head", epochs=5, max_minutes=1e-6, validate_every=4)
    assert (summary.epochs_completed, summary.stopped_by_time) == (1, True)
    assert summary.history[-1]["dice"] is not None  # epoch 1 is not a multiple of 4, yet it was validated
    metadata = json.loads((tmp_path / "head" / "head.json").read_text())
    assert metadata["validation_dice"]["Sphere"] == summary.history[-1]["dice"][0]


@pytest.fixture(scope="module")
def confuser_dataset(small_training):
    """The two sphere cases with a look-alike labelled 2: a 6-voxel-wide block of the background."""
    import SimpleITK as sitk

    root = small_training["root"] / "train"
    out = small_training["root"] / "confusers"
    shutil.copytree(root / "images", out / "images", dirs_exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for path in sorted((root / "labels").glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)  # (K, J, I)
        block = np.zeros_like(array, bool)
        block[2:8, 2:8, 2:8] = True
        array[block & (array == 0)] = 2
        labelled = sitk.GetImageFromArray(array)
        labelled.CopyInformation(image)
        sitk.WriteImage(labelled, str(out / "labels" / path.name))
    return out


def test_confuser_crops_centre_every_crop_on_a_look_alike_and_share_zero_keeps_the_old_crops():
    import torch

    from COLIPRISlicerLib.segmentation.sampling import random_patch_crop

    features = torch.zeros(2, 6, 6, 6)
    image = torch.arange(24**3, dtype=torch.float32).reshape(1, 24, 24, 24)  # each voxel holds its flat index
    target = torch.zeros(1, 24, 24, 24, dtype=torch.long)
    target[0, 1, 1, 1] = 1  # the finding, in patch (0, 0, 0)
    negatives = torch.tensor([[22, 21, 23]])  # a look-alike, in patch (5, 5, 5)

    def start(crop) -> tuple[int, int, int]:
        first = int(crop[1][0, 0, 0, 0])
        return first // 576, first // 24 % 24, first % 24

    rng = np.random.default_rng(0)
    for _ in range(20):
        crop = random_patch_crop(features, image, target, 2, rng, foreground_share=1.0, negatives=negatives,
                                 negative_share=1.0)
        assert start(crop) == (16, 16, 16) and int(crop[2].sum()) == 0  # patches 4-5: the look-alike's, no finding
    plain = [start(random_patch_crop(features, image, target, 2, np.random.default_rng(seed))) for seed in range(12)]
    shared = [start(random_patch_crop(features, image, target, 2, np.random.default_rng(seed), negatives=negatives,
                                      negative_share=0.0)) for seed in range(12)]
    assert plain == shared and (0, 0, 0) in plain  # share 0: the random stream and crops of a run without them


def test_confusers_are_background_for_the_loss_and_the_dice_and_no_class_of_the_head(confuser_dataset,
                                                                                    small_training, tmp_path):
    import torch

    from COLIPRISlicerLib.segmentation.data import confuser_voxels, load_cached
    from COLIPRISlicerLib.segmentation.recipe import RareClasses
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    rare = RareClasses(confusers=(2,), confuser_crops=0.5)
    summary = train_segmentation_head(confuser_dataset / "images", confuser_dataset / "labels", small_training["engine"],
                                      tmp_path / "head", epochs=1, crop_patches=2, rare_classes=rare,
                                      **TRAINING_OPTIONS)
    metadata = json.loads((tmp_path / "head" / "head.json").read_text())
    assert [label["value"] for label in metadata["labels"]] == [1] and metadata["architecture"]["num_classes"] == 2
    assert metadata["training"]["augmentation"] == ("random 2-patch crops, 50% centred on look-alikes learned as"
                                                    " background (label 2)")
    assert list(summary.validation_dice) == ["Sphere"] and summary.validation_dice["Sphere"] is not None
    cached = sorted((tmp_path / "head" / "feature_cache").glob("*.safetensors"))[0]
    values = torch.tensor([0, 1], dtype=torch.int32)
    target = load_cached(cached, values, "cpu", (2,))[2][0]
    voxels = confuser_voxels(cached, (2,), "cpu")
    assert len(voxels) > 0 and int(target[tuple(voxels.T)].max()) == 0  # look-alike voxels: background
    assert torch.equal(target > 0, load_cached(cached, torch.tensor([0, 1, 2], dtype=torch.int32), "cpu")[2][0] == 1)
    with pytest.raises(ValueError, match=r"Confuser label\(s\) \[3\] are in no label map \(found values \[0, 1, 2\]\)"):
        train_segmentation_head(confuser_dataset / "images", confuser_dataset / "labels", small_training["engine"],
                                tmp_path / "other", epochs=1, rare_classes=RareClasses(confusers=(3,)),
                                **TRAINING_OPTIONS)
    with pytest.raises(ValueError, match=r"Label\(s\) \[1\] are both named classes and confusers"):
        train_segmentation_head(confuser_dataset / "images", confuser_dataset / "labels", small_training["engine"],
                                tmp_path / "other", epochs=1, rare_classes=RareClasses(confusers=(1,)),
                                **TRAINING_OPTIONS)
    with pytest.raises(ValueError, match="needs the confusers' label values; got none. Pass them"):
        RareClasses(confuser_crops=0.3)
    with pytest.raises(ValueError, match="Label 0 is the background already"):
        RareClasses(confusers=(0,))
    assert RareClasses(confusers=[6, 2]).confusers == (2, 6)


def test_a_run_started_from_a_trained_head_starts_with_its_weights_and_refuses_another_head(small_training,
                                                                                          tmp_path):
    import torch

    from COLIPRISlicerLib.segmentation.data import cached_facts
    from COLIPRISlicerLib.segmentation.head import load_head
    from COLIPRISlicerLib.segmentation.recipe import HeadRecipe
    from COLIPRISlicerLib.segmentation.training import _TrainingRun

    trained = load_head(small_training["out"], small_training["engine"])
    paths = {path.name: path for path in (small_training["out"] / "feature_cache").glob("*.safetensors")}
    facts = {name: cached_facts(path) for name, path in paths.items()}
    first, second = sorted(paths)
    recipe = HeadRecipe(base_channels=TRAINING_OPTIONS["base_channels"], seed=5)
    run = _TrainingRun.create(small_training["engine"], paths, facts, [first], [second], SPHERE_LABELS, recipe,
                              start_from=small_training["out"])
    started = run.head.network.state_dict()
    assert all(torch.equal(started[name], tensor) for name, tensor in trained.network.state_dict().items())
    assert run.setup["start_from_sha256"] == run.head.metadata.training["started_from"]["sha256"]
    fresh = _TrainingRun.create(small_training["engine"], paths, facts, [first], [second], SPHERE_LABELS, recipe)
    assert "start_from_sha256" not in fresh.setup
    assert not torch.equal(fresh.head.network.state_dict()["output.conv.conv.weight"],
                           started["output.conv.conv.weight"])
    with pytest.raises(ValueError, match="Cannot start from the head in .*Start without it"):
        _TrainingRun.create(small_training["engine"], paths, facts, [first], [second], SPHERE_LABELS,
                            HeadRecipe(base_channels=4), start_from=small_training["out"])
    summary = train_again(small_training, tmp_path / "tuned", epochs=1, start_from=small_training["out"])
    assert summary.epochs_completed == 1
    with pytest.raises(ValueError, match=r"another training run \(start_from_sha256 differ\)"):
        train_again(small_training, tmp_path / "tuned", epochs=2)  # a resume must start from the same head


def test_predict_applies_the_heads_shape_rule_and_says_so(random_head, tiny_engine, sphere_volume):
    from COLIPRISlicerLib.segmentation.head import predict

    encoding = tiny_engine.encode(sphere_volume)
    plain = predict(random_head, encoding, sphere_volume)
    assert (plain.labelmap == 1).any() and "elongation" not in plain.description
    random_head.metadata.postprocessing["1"] = {"max_elongation": 0.5}  # nothing is that round: all removed
    try:
        ruled = predict(random_head, encoding, sphere_volume)
    finally:
        random_head.metadata.postprocessing.clear()
    assert not ruled.labelmap.any()
    assert ruled.metadata["postprocessing"]["voxels_removed"] == {"1": int((plain.labelmap == 1).sum())}
    assert ruled.description.endswith("components of label 1 with elongation > 0.5 removed")
