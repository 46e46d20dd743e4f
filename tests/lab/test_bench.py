"""``shieldproxy bench --quick`` runs and writes well-formed results.

The test checks the runner, not the numbers: timings on a shared machine vary
too much to assert on.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab

QUICK_SCENARIOS = ["resume_gap", "overhead", "absorb", "engage", "handover", "memory"]
VERDICTS = {"met", "missed", "not measured", "-"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, "-m", "shieldproxy", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return completed, out


def test_quick_run_succeeds(quick_run):
    completed, _ = quick_run
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_quick_run_shows_progress(quick_run):
    completed, _ = quick_run
    for name in QUICK_SCENARIOS:
        assert f": {name}" in completed.stderr


def test_results_json_has_every_scenario(quick_run):
    _, out = quick_run
    report = json.loads((out / "results.json").read_text())
    assert report["preset"] == "quick"
    assert list(report["scenarios"]) == QUICK_SCENARIOS
    assert report["machine"]["cores"] >= 1
    assert report["lab_rtt_s"] > 0


def test_results_json_figures_are_well_formed(quick_run):
    _, out = quick_run
    report = json.loads((out / "results.json").read_text())
    for name, scenario in report["scenarios"].items():
        assert scenario["error"] is None, name
        assert scenario["figures"], name
        for figure in scenario["figures"]:
            assert figure["name"]
            assert figure["result"] in VERDICTS, figure
            if figure["target"]:
                assert figure["result"] != "-", figure


def test_resume_gap_runs_both_modes(quick_run):
    _, out = quick_run
    report = json.loads((out / "results.json").read_text())
    runs = report["scenarios"]["resume_gap"]["data"]["runs"]
    assert [run["mode"] for run in runs] == ["shielded", "baseline"]
    for run in runs:
        assert run["integrity"] == "ok", run
        assert run["resume_gap_s"] is not None, run
        assert run["wire_resume_gap_s"] is not None, run
        assert run["probe_samples"] > 0, run


def test_results_md_has_tables(quick_run):
    _, out = quick_run
    text = (out / "results.md").read_text()
    assert "| figure | shield | drop lock | target | result |" in text
    assert "| scenario | figure | shield | target | result |" in text
    assert "| resume gap, 1 s freeze |" in text


def test_plots_are_png_files(quick_run):
    _, out = quick_run
    report = json.loads((out / "results.json").read_text())
    plots = [p for s in report["scenarios"].values() for p in s["plots"]]
    assert "resume_gap_vs_freeze.png" in plots
    assert "resume_gap_timeseq_1s.png" in plots
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
