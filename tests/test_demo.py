"""The demo end to end at its quick size: every report artifact exists and every number is finite."""

import json
import math

import pytest

from repa.cli import main


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(tmp_path):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--with-repa-e", "--output", str(output)]) == 0
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
def test_demo_is_deterministic_for_a_seed(tmp_path):
    first = tmp_path / "a"
    second = tmp_path / "b"
    assert main(["demo", "--quick", "--output", str(first)]) == 0
    assert main(["demo", "--quick", "--output", str(second)]) == 0
    rows_a = json.loads((first / "summary.json").read_text())["rows"]
    rows_b = json.loads((second / "summary.json").read_text())["rows"]

    def key(rows):
        return [(r["run"], r["step"], r["fd"]) for r in rows]

    assert key(rows_a) == key(rows_b)
