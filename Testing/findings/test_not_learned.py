"""Findings a model did not learn: neither present nor absent wherever a result is shown."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.report.evaluation import extract_findings
from COLIPRISlicerLib.teaching.phantom import generate_phantom
from COLIPRISlicerLib.model.folder import update_model_record

#: One finding a threshold of 0 would call present everywhere, one that 1 would call absent everywhere.
NOT_LEARNED = {"Lymphadenopathy": "degenerate threshold 0.004", "Emphysema": "degenerate threshold 0.999"}


@pytest.fixture(scope="module")
def analysed(tiny_model_folder, tmp_path_factory):
    folder = shutil.copytree(tiny_model_folder, tmp_path_factory.mktemp("not-learned") / "model")
    update_model_record(folder, thresholds={"Lymphadenopathy": 0.0, "Emphysema": 1.0}, not_learned=NOT_LEARNED)
    analyzer = Analyzer(Engine(str(folder), device="cpu", precision="fp32"))
    volume, _ = generate_phantom(20_000_300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return analyzer, analyzer.analyze(volume)


def test_a_finding_not_learned_is_neither_present_nor_absent(analysed):
    _, result = analysed
    lymph, emphysema = result.finding("Lymphadenopathy"), result.finding("Emphysema")
    assert lymph.likelihood >= lymph.threshold == 0.0  # the degenerate threshold would call it present
    assert lymph.status == emphysema.status == "not learned" and not lymph.present and not emphysema.present
    assert lymph.as_dict()["not_learned"] == "degenerate threshold 0.004" and lymph.as_dict()["status"] == "not learned"
    others = [f for f in result.findings if f.name not in NOT_LEARNED]
    assert all(f.status == ("present" if f.likelihood >= f.threshold else "absent") for f in others)


def test_the_report_neither_asserts_nor_denies_a_finding_not_learned_and_says_so(analysed):
    analyzer, result = analysed
    report = analyzer.report(result)
    said = [line for lines in report.sections.values() for line in lines if not line.startswith("Not assessed")]
    assert not [line for line in said + report.impression if "lymph" in line.lower() or "emphysema" in line.lower()]
    unassessed = {section: line for section, lines in report.sections.items() for line in lines
                  if line.startswith("Not assessed")}
    assert "emphysema" in unassessed["Lungs and airways"].lower()
    assert unassessed["Mediastinum and hila"] == "Not assessed for lymphadenopathy (this model did not learn it)."
    assert "No abnormality" not in " ".join(report.sections["Mediastinum and hila"])
    # the report evaluation's reader takes a finding not assessed as not reported present
    read = extract_findings(report.to_markdown())
    assert not read["Lymphadenopathy"] and not read["Emphysema"]
    assert "Not assessed (this model did not learn them): Lymphadenopathy, Emphysema." in report.footer or \
        "Not assessed (this model did not learn them): Emphysema, Lymphadenopathy." in report.footer


def test_the_command_line_table_and_findings_json_say_not_learned(analysed, tmp_path, capsys):
    from COLIPRISlicerLib.cli.analyze import print_findings as _print_findings
    from COLIPRISlicerLib.export.outputs import write_analysis

    _, result = analysed
    _print_findings(result)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["Lymphadenopathy"].rstrip().endswith("not learned")
    document = json.loads(write_analysis(result, tmp_path / "out", heatmaps=None).read_text())
    by_name = {entry["name"]: entry for entry in document["findings"]}
    assert by_name["Emphysema"]["status"] == "not learned" and by_name["Emphysema"]["present"] is False


def test_the_summary_picture_labels_findings_not_learned(analysed, tmp_path):
    from matplotlib.figure import Figure

    from COLIPRISlicerLib.export.summary_figure import _likelihood_bars

    _, result = analysed
    ax = Figure().add_subplot()
    _likelihood_bars(ax, result, None)
    labels = [tick.get_text() for tick in ax.get_yticklabels()]
    assert "Lymphadenopathy (not learned)" in labels and "Emphysema (not learned)" in labels
    hatched = {label for label, bar in zip(labels, ax.patches) if bar.get_hatch()}
    assert hatched == {"Lymphadenopathy (not learned)", "Emphysema (not learned)"}


def test_the_model_record_reaches_the_engine_and_the_catalogue(analysed):
    analyzer, _ = analysed
    assert analyzer.engine.extras.not_learned == NOT_LEARNED
    assert {f.name: f.not_learned for f in analyzer.catalogue if f.not_learned} == NOT_LEARNED
