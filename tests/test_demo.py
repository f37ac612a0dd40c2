"""The demo end to end at its quick size: every report artifact exists and every number is finite."""

import json
import math

import pytest

from repa.cli import main


@pytest.fixture(scope="module")
def quick_demo_with_repae(tmp_path_factory):
    """One `repa demo --quick --with-repa-e` for the module's tests (a quick demo is most of a
    minute on a small CPU)."""
    output = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--quick", "--with-repa-e", "--output", str(output)]) == 0
    return output


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(quick_demo_with_repae):
    output = quick_demo_with_repae
    summary = json.loads((output / "summary.json").read_text())
    report = (output / "report.md").read_text()
    for name in ("curves.csv", "curves.json", "fd_vs_step.png", "fd_vs_step.svg"):
        assert (output / "report" / name).is_file(), name
    for run in ("sit", "repa", "repa-e"):
        assert (output / "report" / f"samples_{run}.png").is_file()
        assert f"samples_{run}.png" in report
        steps = [row["step"] for row in summary["rows"] if row["run"] == run]
        assert steps == [10, 20]  # every checkpoint scored
    assert "fd_vs_step.png" in report
    numbers = [row["fd"] for row in summary["rows"]] + [summary["real_vs_real_fd"]]
    numbers += [summary["teacher"]["test_accuracy"], summary["evaluator"]["test_accuracy"]]
    assert all(math.isfinite(x) for x in numbers)
    assert set(summary["speedup"]) == {"sit", "repa", "repa-e"}
    # the teacher went through the ordinary local-encoder path and is recorded as a file
    assert summary["teacher"]["path"].endswith("demo-encoder.safetensors")


@pytest.mark.slow
def test_demo_is_deterministic_for_a_seed(quick_demo_with_repae, tmp_path):
    """A second demo of the same seed scores its SiT and REPA checkpoints exactly as the first,
    which also ran REPA-E: an added arm does not move the others."""
    second = tmp_path / "b"
    assert main(["demo", "--quick", "--output", str(second)]) == 0
    rows_a = json.loads((quick_demo_with_repae / "summary.json").read_text())["rows"]
    rows_b = json.loads((second / "summary.json").read_text())["rows"]

    def key(rows):
        return [(r["run"], r["step"], r["fd"]) for r in rows if r["run"] in ("sit", "repa")]

    assert key(rows_a) == key(rows_b) and len(key(rows_b)) == 4
