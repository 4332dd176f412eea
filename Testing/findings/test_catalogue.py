"""Catalogue files: validation with errors that name the problem, user extensions."""

from __future__ import annotations

import pytest

from COLIPRISlicerLib.findings.catalogue import free_text_finding, load_catalogue, pair_from_text, slugify


def write(tmp_path, text):
    path = tmp_path / "catalogue.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "match"), [
    ("findings: []", "non-empty list"),
    ("- a\n- b", "non-empty list"),
    ("findings:\n  - {region: lungs}", "needs a non-empty `name`"),
    ("findings:\n  - {name: X, prompts: [[only one]]}", r"\[negative, positive\] pairs"),
    ("findings:\n  - {name: X, region: brain}", "unknown region 'brain'"),
    ("findings:\n  - {name: X, threshold: 1.5}", "between 0 and 1"),
    ("findings:\n  - {name: X, colour: [1, 2]}", "three numbers"),
    ("findings:\n  - {name: X, terminology: {code: '1'}}", "scheme"),
    ("findings:\n  - {name: Lung nodule}\n  - {name: lung  nodule}", "have the same name"),
    ("findings: [", "not valid YAML"),
])
def test_invalid_catalogues_are_explained(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_catalogue(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue not found"):
        load_catalogue(tmp_path / "none.yaml")


def test_user_catalogue_without_prompts_gets_a_generated_pair(tmp_path):
    catalogue = load_catalogue(write(tmp_path, "findings:\n  - {name: Rib fracture, region: devices, threshold: 0.3}"))
    finding = catalogue.get("rib fracture")
    assert finding.prompts == (("Rib fracture is not present.", "Rib fracture is present."),)
    assert finding.threshold == 0.3


def test_thresholds_round_trip_through_yaml(tmp_path):
    catalogue = load_catalogue().with_thresholds({"Emphysema": 0.37})
    path = tmp_path / "calibrated.yaml"
    catalogue.to_yaml(path)
    again = load_catalogue(path)
    assert again.get("Emphysema").threshold == 0.37
    assert [f.prompts for f in again] == [f.prompts for f in catalogue]


def test_free_text_and_slugs():
    assert slugify("Coronary artery wall calcification") == "coronary-artery-wall-calcification"
    assert pair_from_text("  rib   fracture. ") == ("Rib fracture is not present.", "Rib fracture is present.")
    assert free_text_finding("rib fracture").free_text
    with pytest.raises(ValueError, match="Empty finding"):
        pair_from_text("  ")
