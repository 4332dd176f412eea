"""Shape rules on a head's labelmap (segmentation/postprocessing.py): elongation of components in mm,
removal of elongated components of one label, and the threshold chosen on cases."""

from __future__ import annotations

import numpy as np
import pytest

from COLIPRISlicerLib.segmentation.postprocessing import (
    MIN_DICE_GAIN,
    choose_max_elongation,
    component_elongations,
    drop_elongated,
)


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    points = np.indices(shape).transpose(1, 2, 3, 0) * np.asarray(spacing)
    return np.linalg.norm(points - np.asarray(centre), axis=-1) <= radius


def cylinder(shape, start, length, radius, axis=2) -> np.ndarray:
    """Along ``axis`` from ``start`` (voxel index, 1 mm grid)."""
    points = np.indices(shape).transpose(1, 2, 3, 0).astype(float)
    across = [a for a in range(3) if a != axis]
    distance = np.linalg.norm(points[..., across] - np.asarray(start, float)[across], axis=-1)
    along = points[..., axis] - start[axis]
    return (distance <= radius) & (along >= 0) & (along < length)


def test_a_ball_is_round_and_a_cylinder_three_times_as_long_as_wide_is_3_5_on_any_grid_or_rotation():
    spacing = np.diag([0.7, 0.7, 5.0, 1.0])
    shape = (60, 60, 10)
    round_one = ball(shape, (21, 21, 25), 10.0, (0.7, 0.7, 5.0))
    _, elongation = component_elongations(round_one, spacing)
    assert elongation == pytest.approx([1.0], abs=0.15)  # five 5 mm slices: 25 mm of boxes for a 20 mm ball
    small = ball(shape, (21, 21, 25), 3.0, (0.7, 0.7, 5.0))  # a 6 mm nodule: on one 5 mm slice only
    assert np.flatnonzero(small.any(axis=(0, 1))).tolist() == [5]
    _, elongation = component_elongations(small, spacing)
    assert elongation[0] < 1.3  # (r^2 / 4) / (5^2 / 12) ~ 1: its voxels' boxes, not a flat disc's infinity
    tube = cylinder((40, 40, 80), (20, 20, 10), 60, 10)  # length 6 r: sqrt((L^2 / 12) / (r^2 / 4)) = sqrt(12)
    _, elongation = component_elongations(tube, np.eye(4))
    assert elongation == pytest.approx([np.sqrt(12)], rel=0.03)
    rotation = np.eye(4)
    rotation[:3, :3] = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    assert component_elongations(tube, rotation)[1] == pytest.approx(elongation, rel=1e-9)
    _, single = component_elongations(np.pad(np.ones((1, 1, 1), bool), 2), np.eye(4))
    assert single == pytest.approx([1.0])  # one voxel: its box, not an infinite ratio


def test_drop_elongated_removes_the_tubes_of_one_label_only_and_counts_the_voxels():
    shape = (50, 50, 80)
    labelmap = np.zeros(shape, np.int16)
    labelmap[ball(shape, (12, 12, 20), 6)] = 1
    tube = cylinder(shape, (35, 35, 5), 60, 4)
    labelmap[tube] = 1
    labelmap[cylinder(shape, (12, 38, 30), 45, 3)] = 2
    before = labelmap.copy()
    removed = drop_elongated(labelmap, 1, 2.5, np.eye(4))
    assert removed == int(tube.sum()) and not (labelmap[tube]).any()
    assert np.array_equal(labelmap[~tube], before[~tube])  # the ball and label 2's tube are kept
    assert drop_elongated(labelmap, 1, float("inf"), np.eye(4)) == 0
    assert drop_elongated(labelmap, 3, 2.5, np.eye(4)) == 0  # an absent label


def test_the_chosen_threshold_keeps_the_balls_drops_the_tubes_and_ties_keep_the_largest():
    shape = (50, 50, 80)
    truth = ball(shape, (12, 12, 20), 6)
    predicted = truth | cylinder(shape, (35, 35, 5), 60, 4)  # the nodule and a vessel
    empty_truth = (predicted, np.zeros(shape, bool), np.eye(4))  # a case without the finding: not scored
    threshold, dice = choose_max_elongation([(predicted, truth, np.eye(4)), empty_truth])
    tube_elongation = component_elongations(predicted, np.eye(4))[1].max()
    assert threshold == max(t for t in dice if t < tube_elongation)  # the largest that drops the tube
    assert dice[threshold] == pytest.approx(1.0) and dice[float("inf")] < 0.5
    with pytest.raises(ValueError, match="No case holds the label.*Use more cases"):
        choose_max_elongation([empty_truth])
    speck = truth.copy()
    speck[0, 0, 79] = True  # one false voxel: dropping it gains less than MIN_DICE_GAIN, so no rule
    threshold, dice = choose_max_elongation([(speck, truth, np.eye(4))])
    assert threshold == float("inf") and max(dice.values()) - dice[threshold] < MIN_DICE_GAIN


def test_head_json_keeps_the_rules_and_heads_from_before_them_have_none(tmp_path):
    from COLIPRISlicerLib.segmentation.files import HeadMetadata, LabelInfo

    metadata = HeadMetadata([LabelInfo(1, "Lung nodule", (1.0, 0.0, 0.0), {})], {"sha256": "x"}, {}, {},
                            postprocessing={"1": {"max_elongation": 2.5}})
    reread = HeadMetadata.from_dict(metadata.as_dict(), tmp_path / "head.json")
    assert reread.postprocessing == {"1": {"max_elongation": 2.5}}
    assert metadata.as_dict()["format_version"] == 2  # an older reader refuses it instead of skipping the rule
    older = {k: v for k, v in metadata.as_dict().items() if k != "postprocessing"}
    assert HeadMetadata.from_dict(older, tmp_path / "head.json").postprocessing == {}  # heads from before the rules
    assert HeadMetadata.from_dict(older, tmp_path / "head.json").as_dict()["format_version"] == 1
    for bad in ({"2": {"max_elongation": 2.5}}, {"1": {"max": 2.5}}):
        with pytest.raises(RuntimeError, match="Invalid postprocessing rule .* fix or remove it"):
            HeadMetadata.from_dict({**older, "postprocessing": bad}, tmp_path / "head.json")
