"""``smt-monai benchmark``: the report from figures, overrides, and the whole ``--quick`` run (CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smt_monai.benchmark.ablation import VARIANTS, merge_ablation, select_variants
from smt_monai.benchmark.accuracy import held_out_datalist
from smt_monai.benchmark.bundle_runs import parse_overrides
from smt_monai.benchmark.report import write_report
from smt_monai.cli import main
from smt_monai.data import load_datalist, open_slide, tissue_bbox
from smt_monai.data.slide import cucim_available
from smt_monai.data.synth import make_cohort

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


def _speed_result(device: str, side: int, seconds_k8: float) -> dict:
    result = {
        "environment": {"device": device, **({"gpu": "NVIDIA H100 80GB HBM3"} if device == "cuda" else {})},
        "slide_width": side,
        "slide_height": side,
        "backend": "cucim",
        "num_workers": 16,
        "preset": "paper",
        "read_size": 512,
        "repeats": 5,
        "dense_seconds": 18.0,
        "dense_seconds_per_tile": 0.0003,
        "dense_tiles_total": 60000,
        "dense_tiles_timed": 2000,
        "dense_extrapolated": True,
        "dense_read_wait": 0.2,
        "dense_compute": 0.3,
        "by_size": [
            {
                "size": side,
                "smt_seconds_k4": 0.3,
                "dense_tiles": 60000,
                "dense_seconds": 18.0,
                "model_rss_mb": 1300,
                "peak_rss_mb": 2200,
            }
        ],
    }
    for k, regions, seconds in ((4, 21, 0.3), (8, 73, seconds_k8)):
        result |= {
            f"regions_k{k}": regions,
            f"smt_seconds_k{k}": seconds,
            f"smt_compute_seconds_k{k}": 0.1,
            f"smt_read_wait_seconds_k{k}": 0.1,
            f"floor_seconds_k{k}": 0.2,
            f"smt_over_floor_k{k}": seconds / 0.2,
            f"dense_over_smt_k{k}": 18.0 / seconds,
        }
    return result


@pytest.mark.parametrize(
    ("side", "seconds_k8", "verdict"),
    [
        (100000, 0.66, "0.660 s, met"),
        (100000, 2.5, "2.500 s, **missed**"),
        (60000, 0.5, "0.500 s, not judged, the slide is smaller than 100000 px"),
    ],
)
def test_report_judges_a_gpu_run_by_its_own_target(
    tmp_path: Path, side: int, seconds_k8: float, verdict: str
) -> None:
    cpu, gpu = tmp_path / "speed.json", tmp_path / "speed_gpu.json"
    cpu.write_text(json.dumps(_speed_result("cpu", 60000, 1.2)))
    gpu.write_text(json.dumps(_speed_result("cuda", side, seconds_k8)))
    text = write_report(tmp_path / "b.md", cpu, None, None, gpu_speed_json=gpu).read_text()
    cpu_part, gpu_part = text.split("## Speed on a GPU (NVIDIA H100 80GB HBM3)")
    assert "Targets (K = 4):" in cpu_part and "Target (GPU" not in cpu_part
    assert "Targets (K = 4):" not in gpu_part
    assert f"under 2 s per 100000 x 100000 px slide: {verdict}" in gpu_part
    assert "device cuda (NVIDIA H100 80GB HBM3)" in text
    assert "time_vs_size_gpu.png" not in text  # one slide size: no plot
    missing = write_report(tmp_path / "c.md", cpu, None, None, gpu_speed_json=tmp_path / "none.json")
    assert "**speed on a GPU (`scripts/bench_gpu.sh`)**: not run" in missing.read_text()


def test_select_variants_by_name() -> None:
    assert select_variants() == VARIANTS
    chosen = select_variants(["forward + backward", "default (no L_focus"])
    assert list(chosen) == ["paper: forward + backward", "default (no L_focus; L_ret drives the focus)"]
    assert chosen["paper: forward + backward"] == {"focus_weight": [1.0, 1.0]}
    with pytest.raises(ValueError, match="no ablation variant matches"):
        select_variants(["nonexistent"])


def test_held_out_datalist_adds_a_second_cohort_to_the_testing_split(tmp_path: Path) -> None:
    datalist = make_cohort(tmp_path / "cohort", 5, 1024, 3, split=(0.6, 0.0, 0.4), workers=1, progress=False)
    assert held_out_datalist(tmp_path, datalist, 0, 1024, 3) == datalist
    combined = held_out_datalist(tmp_path, datalist, 2, 1024, 3)
    assert combined.parent == tmp_path / "cohort_2x1024_seed1003_test"
    own = load_datalist(datalist, "testing", str(datalist.parent))
    testing = load_datalist(combined, "testing", str(combined.parent))
    assert len(own) == 2 and len(testing) == 4
    assert [e["image"] for e in testing[:2]] == [e["image"] for e in own]
    assert all(Path(e["image"]).is_file() and Path(e["annotation"]).is_file() for e in testing)
    assert all(Path(e["image"]).parent.parent == combined.parent for e in testing[2:])
    assert held_out_datalist(tmp_path, datalist, 2, 1024, 3) == combined  # written once, then reused


def _ablation_result(variants: dict[str, list[int]], ks: list[int], **same: object) -> dict:
    result = {"cohort": "c", "num_slides": 8, "slide_size": 1024, "smt_overrides": {"grid": 4}, **same}
    result["variants"] = {name: {"overrides": VARIANTS[name], "seeds": s} for name, s in variants.items()}
    result["seeds"] = sorted({s for seeds in variants.values() for s in seeds})
    result["k_sweep"] = [{"k": k, "balanced_accuracy": 0.1 * k} for k in ks]
    return result


def test_merge_ablation_adds_up_subsets_of_one_cohort() -> None:
    names = list(VARIANTS)
    previous = _ablation_result({names[5]: [0], names[0]: [0]}, [1, 4], command="first")
    current = _ablation_result({names[5]: [0, 1, 2], names[3]: [0]}, [4, 8])
    current["k_sweep"][0]["balanced_accuracy"] = 0.9
    merged = merge_ablation(previous, current)
    assert list(merged["variants"]) == [names[0], names[3], names[5]]  # VARIANTS order
    assert merged["variants"][names[5]]["seeds"] == [0, 1, 2] and merged["seeds"] == [0, 1, 2]
    assert [(p["k"], p["balanced_accuracy"]) for p in merged["k_sweep"]] == [(1, 0.1), (4, 0.9), (8, 0.8)]
    assert merged["merged_commands"] == ["first"]
    other = _ablation_result({names[0]: [0]}, [1], smt_overrides={"grid": 8})
    assert list(merge_ablation(other, _ablation_result({names[3]: [0]}, [4]))["variants"]) == [names[3]]


@pytest.mark.slow
def test_quick_run_writes_every_figure_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    work = str(tmp_path / "work")
    args = ["benchmark", "all", "--quick", "--work-dir", work, "--sizes", "1024", "2048", "--ks", "1", "4"]
    status = main([*args, "--extra-test-slides", "2", "--out", str(out)])
    assert status == 0
    speed = json.loads((tmp_path / "work" / "speed.json").read_text())
    accuracy = json.loads((tmp_path / "work" / "accuracy.json").read_text())
    ablation = json.loads((tmp_path / "work" / "ablation.json").read_text())
    throughput = json.loads((tmp_path / "work" / "throughput.json").read_text())
    assert all(throughput[f"slides_per_hour_p{p}_f{f}"] > 0 for p in (1, 2) for f in (1, 2))
    assert all(speed[k] is not None for k in SPEED_KEYS)
    assert all(k in accuracy for k in ACCURACY_KEYS)
    assert [p["k"] for p in ablation["k_sweep"]] == [1, 4]
    # the quick cohort's 8 slides leave 2 for testing; 2 more come from the second cohort
    assert accuracy["num_test_slides"] == 4 and ablation["extra_test_slides"] == 2
    assert speed["quick"] and [p["size"] for p in speed["by_size"]] == [1024, 2048]
    assert all(p["peak_rss_mb"] > 0 for p in speed["by_size"])
    text = out.read_text()
    assert "## Speed" in text and "## Throughput" in text and "## Accuracy" in text and "## Ablations" in text
    assert "plus 2 slides of a second cohort" in text
    assert (tmp_path / "benchmarks" / "time_vs_size.png").exists()  # two sizes: a plot
    assert (tmp_path / "benchmarks" / "accuracy_vs_k.png").exists()


@pytest.mark.skipif(not cucim_available(), reason="cuCIM is not installed")
def test_gpu_decoding_probe_times_cpu_decoding_and_reports_the_gpu_path(tiny_slide: Path) -> None:
    script = Path(__file__).parents[1] / "scripts" / "probe_gpu_decode.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_slide), "--side", "256", "--count", "5", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert any(line.startswith("cuCIM cpu decoding: 5 regions of 256 px in ") for line in lines)
    cuda = [line for line in lines if line.startswith("cuCIM cuda decoding: ")]
    assert len(cuda) == 1  # a time where nvJPEG works, else the reason it failed
    if not torch.cuda.is_available():
        assert "failed" in cuda[0]
    with open_slide(tiny_slide) as slide:  # by default, regions as big as the last layer's (grid 4)
        x0, y0, x1, y1 = tissue_bbox(slide)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_slide), "--grid", "4", "--count", "3", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"cuCIM cpu decoding: 3 regions of {round(max(x1 - x0, y1 - y0) / 16)} px in " in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not cucim_available(), reason="cuCIM is not installed")
def test_gpu_benchmark_script_checks_each_import_and_prints_the_table_on_a_cpu(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "scripts" / "bench_gpu.sh"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "BENCH_DEVICE": "cpu",
        "BENCH_SIZE": "4096",
        "BENCH_WORK": str(tmp_path),
    }
    options = ["--repeats", "1", "--max-tiles", "8", "--preset", "tiny"]
    done = subprocess.run(["bash", str(script), *options], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    imported = [line.split(":")[0] for line in lines if line.startswith("import ")]
    assert imported[-1] == "import smt_monai" and "import cucim" in imported and "import monai" in imported
    assert (tmp_path / "import_cucim.log").read_text().strip()  # -X importtime's record, for a stalled import
    assert any(line.startswith("  SMT K=8: ") and "SMT/floor" in line for line in lines)
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["slide_width"] == 4096 and all(speed[k] is not None for k in SPEED_KEYS)
    assert any(line.startswith("cuCIM cuda decoding: ") for line in lines)
