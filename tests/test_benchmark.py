"""``smt-monai benchmark``: the report from figures, overrides, and the whole ``--quick`` run (CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smt_monai.benchmark.ablation import VARIANTS, select_variants
from smt_monai.benchmark.bundle_runs import parse_overrides
from smt_monai.benchmark.report import write_report
from smt_monai.cli import main

SPEED_KEYS = ("dense_over_smt_k4", "smt_over_floor_k4", "smt_seconds_k4", "smt_seconds_k8", "dense_seconds")
ACCURACY_KEYS = (
    "balanced_accuracy_smt_k4",
    "balanced_accuracy_dense",
    "auc_smt_k4",
    "auc_dense",
    "focus_hit_rate_k4",
    "focus_precision_k4",
)


def test_parse_overrides_reads_json_values() -> None:
    parsed = parse_overrides(["max_epochs=3", "focus_weight=[1.0, 1.0]", "preset=tiny"])
    assert parsed == {"max_epochs": 3, "focus_weight": [1.0, 1.0], "preset": "tiny"}
    with pytest.raises(ValueError):
        parse_overrides(["max_epochs"])


def test_report_says_which_benchmark_is_missing(tmp_path: Path) -> None:
    out = write_report(tmp_path / "b.md", tmp_path / "none.json", None, None)
    text = out.read_text()
    assert "**speed**: not run" in text and "**ablation**: not run" in text


def test_select_variants_by_name() -> None:
    assert select_variants() == VARIANTS
    chosen = select_variants(["forward + backward", "default (no L_focus"])
    assert list(chosen) == ["paper: forward + backward", "default (no L_focus; L_ret drives the focus)"]
    assert chosen["paper: forward + backward"] == {"focus_weight": [1.0, 1.0]}
    with pytest.raises(ValueError, match="no ablation variant matches"):
        select_variants(["nonexistent"])


@pytest.mark.slow
def test_quick_run_writes_every_figure_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    work = str(tmp_path / "work")
    args = ["benchmark", "all", "--quick", "--work-dir", work, "--sizes", "1024", "--ks", "1", "4"]
    status = main([*args, "--out", str(out)])
    assert status == 0
    speed = json.loads((tmp_path / "work" / "speed.json").read_text())
    accuracy = json.loads((tmp_path / "work" / "accuracy.json").read_text())
    ablation = json.loads((tmp_path / "work" / "ablation.json").read_text())
    assert all(speed[k] is not None for k in SPEED_KEYS)
    assert all(k in accuracy for k in ACCURACY_KEYS)
    assert [p["k"] for p in ablation["k_sweep"]] == [1, 4]
    assert speed["quick"] and speed["by_size"][0]["peak_rss_mb"] > 0
    text = out.read_text()
    assert "## Speed" in text and "## Accuracy" in text and "## Ablations" in text
    assert (tmp_path / "benchmarks" / "time_vs_size.png").exists()
    assert (tmp_path / "benchmarks" / "accuracy_vs_k.png").exists()
