"""``smt-monai benchmark``: the report from figures, overrides, and the whole ``--quick`` run (CI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

from smt_monai.benchmark.ablation import DEPARTURES, TABLE2, merge_ablation, select_variants, variants
from smt_monai.benchmark.accuracy import cohort_digest, held_out_cohort, held_out_datalist
from smt_monai.benchmark.bundle_runs import (
    bundle_device,
    bundle_workflow,
    config_names,
    config_value,
    parse_overrides,
    run_dir,
)
from smt_monai.benchmark.cli import REDRAWN_COHORT
from smt_monai.benchmark.focus_diagnostic import CATEGORIES
from smt_monai.benchmark.report import accuracy_section, write_report
from smt_monai.cli import main
from smt_monai.data import load_datalist, open_slide, tissue_bbox
from smt_monai.data.errors import OptionError
from smt_monai.data.slide import cucim_available
from smt_monai.data.synth import make_cohort

SPEED_KEYS = ("dense_over_smt_k4", "smt_over_floor_k4", "smt_seconds_k4", "smt_seconds_k8", "dense_seconds")
ACCURACY_KEYS = (
    "balanced_accuracy_smt_k4",
    "balanced_accuracy_dense",
    "auc_smt_k4",
    "auc_dense",
    "focus_hit_rate_k4",
    "focus_hit_rate_chance_k4",
    "focus_top1_k4",
    "focus_region_precision_chance_k4",
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


def test_configs_merge_over_their_base_and_key_their_runs(tmp_path: Path) -> None:
    assert config_names("paper.yaml") == ["train.yaml", "paper.yaml"]
    assert config_names("train.yaml+cpu.yaml+paper.yaml+evaluate.yaml") == [
        "train.yaml",
        "cpu.yaml",
        "paper.yaml",
        "evaluate.yaml",
    ]
    assert config_names(["paper.yaml", "evaluate.yaml"]) == ["train.yaml", "paper.yaml", "evaluate.yaml"]
    assert config_names("evaluate_dense.yaml") == ["train_dense.yaml", "evaluate_dense.yaml"]
    assert config_value("paper.yaml", "loss#class_balanced") == [False, False, False]
    assert config_value("train.yaml", "optimizer") == "@optimizers#adamw"
    data = tmp_path / "cohort" / "datalist.json"
    plain = run_dir(tmp_path, data, "smt", {"max_epochs": 3})
    assert plain == run_dir(tmp_path, data, "smt", {"max_epochs": 3}, ())
    paper = run_dir(tmp_path, data, "smt", {"max_epochs": 3}, ["paper.yaml"])
    assert (
        len({plain, paper, run_dir(tmp_path, data, "smt", {"max_epochs": 3}, ["cpu.yaml", "paper.yaml"])})
        == 3
    )


def test_select_variants_by_name() -> None:
    assert select_variants() == variants()
    chosen = select_variants(["forward + backward", "default - no L_focus"])
    assert list(chosen) == ["paper: forward + backward", "default - no L_focus"]
    assert chosen["paper: forward + backward"] == (("paper.yaml",), {})
    assert chosen["default - no L_focus"] == ((), {"focus_weight": [1.0, 1.0]})
    assert list(select_variants(["default", "exploration"])) == [
        "paper + exploration",
        "default",
        "default - exploration",
    ]  # a whole name picks that variant alone, a part of a name every variant holding it
    with pytest.raises(ValueError, match="no ablation variant matches"):
        select_variants(["nonexistent"])


def test_an_unknown_variant_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "benchmark",
        "ablation",
        "--quick",
        "--work-dir",
        str(tmp_path / "w"),
        "--variants",
        "nonexistent",
    ]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no ablation variant matches ['nonexistent']; the variants: ")
    assert "\n" not in error and not (tmp_path / "w").exists()


def _signature(overlays: tuple[str, ...], overrides: dict, tmp_path: Path) -> dict[str, object]:
    """What a variant trains with, read off its parsed bundle: each entry one departure's settings."""
    flow = bundle_workflow(
        ["train.yaml", "cpu.yaml", *overlays],
        "training",
        {**TINY_OVERRIDES, **overrides, "dataset_dir": str(tmp_path)},
    )
    get = flow.parser.get_parsed_content
    optimizer, loss, cascade = get("optimizer"), get("loss"), get("cascade")
    return {
        "AdamW and cosine decay": (
            type(optimizer).__name__,
            [g["lr"] for g in optimizer.param_groups],
            type(get("lr_scheduler")).__name__,
        ),
        "L_F trains the encoders": get("network").layer1.focus_grad_to_encoder,
        "annotation guidance": cascade.guide,
        "L_ann (q taught every annotated patch)": loss.annotation_weight,
        "layer-1 picks spread apart": get("network").spread_focus,
        "exploration": cascade.explore,
        "flips / quarter turns": cascade.augment,
        "class-balanced L_cls": [c.class_balanced for c in loss.classification],
        "no L_focus": loss.focus_weight,
        "the base config's layer schedule": (get("start_epoch"), get("ramp_epochs")),
        "table 2": (get("lambda_bwd"), loss.recheck_weight, loss.distillation_weight, cascade.focus_source),
    }


def test_each_departure_changes_exactly_its_settings(tmp_path: Path) -> None:
    """``paper + X`` differs from ``paper.yaml`` in X's settings only, which are the default's; ``default -
    X`` differs from the default in X's only, which are the paper's."""
    grid = variants(["cpu.yaml"])
    assert list(grid)[: len(TABLE2)] == list(TABLE2) and len(grid) == len(TABLE2) + 2 * len(DEPARTURES) + 1
    paper = _signature(grid["paper: forward + backward"].overlays, {}, tmp_path)
    default = _signature((), {}, tmp_path)
    assert all(paper[name] != default[name] for name in DEPARTURES)
    assert paper["AdamW and cosine decay"] == ("SGD", [0.002, 0.002, 0.01], "ConstantLR")
    assert paper["the base config's layer schedule"] == ([1, 16, 40], 16)  # 20% and 50% of cpu.yaml's 80
    for name in DEPARTURES:
        for variant, base, other in (
            (f"paper + {name}", paper, default),
            (f"default - {name}", default, paper),
        ):
            seen = _signature(*grid[variant], tmp_path)
            assert {k for k in seen if seen[k] != base[k]} == {name}, variant
            assert seen[name] == other[name], variant
    only_forward = _signature(*grid["paper: forward only, focus by attention"], tmp_path)
    assert only_forward["table 2"] == (0.0, 1.0, 1.0, "attention")


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


def test_cohort_digest_follows_the_slides_not_their_folder(tmp_path: Path) -> None:
    datalist = make_cohort(tmp_path / "c40", 3, 1024, 3, split=(0.6, 0.0, 0.4), workers=1, progress=False)
    moved = Path(shutil.copytree(datalist.parent, tmp_path / "elsewhere" / "c40")) / "datalist.json"
    assert cohort_digest([datalist]) == cohort_digest([moved])
    redrawn = make_cohort(tmp_path / "again", 3, 1024, 4, split=(0.6, 0.0, 0.4), workers=1, progress=False)
    assert cohort_digest([redrawn]) != cohort_digest([datalist])  # the same names, other slides
    relabelled = json.loads(datalist.read_text())
    relabelled["training"][0]["label"] = 1 - relabelled["training"][0]["label"]
    moved.write_text(json.dumps(relabelled))
    assert cohort_digest([moved]) != cohort_digest([datalist])


def test_own_cohort_holds_out_its_testing_split_and_other_datalists(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = make_cohort(tmp_path / "mine", 5, 1024, 3, split=(0.6, 0.0, 0.4), workers=1, progress=False)
    other = make_cohort(tmp_path / "scanner2", 2, 1024, 4, split=(0.0, 0.0, 1.0), workers=1, progress=False)
    datalist, test_datalist, suffix, record = held_out_cohort(
        tmp_path / "work", 0, 0, 0, 30, dataset_dir=own.parent, test_datalists=[other]
    )
    assert datalist == own and test_datalist.parent == tmp_path / "work" / "held_out"
    testing = load_datalist(test_datalist, "testing", str(test_datalist.parent))
    mine = load_datalist(own, "testing", str(own.parent))
    assert len(testing) == 4 and [e["image"] for e in testing[:2]] == [e["image"] for e in mine]
    assert all(Path(e["image"]).parent.parent == other.parent for e in testing[2:])
    assert record["num_slides"] == 5 and record["test_datalists"] == [str(other.resolve())]
    assert suffix and held_out_cohort(tmp_path / "work", 0, 0, 0, 0, None, own.parent, [other])[2] == suffix
    alone = held_out_cohort(tmp_path / "work", 0, 0, 0, 0, None, own.parent)
    assert alone[1:3] == (own, "") and alone[3]["cohort_digest"] != record["cohort_digest"]
    section = "\n".join(
        accuracy_section(
            {
                **record,
                "smt_model": "m.pt",
                "smt_overrides": {},
                "dense_overrides": {},
                "auc_dense": 1.0,
                "balanced_accuracy_dense": 1.0,
            }
        )
    )
    assert f"`{own.parent}` (5 slides); SMT the model `m.pt`" in section
    judged = {**record, "smt_model": None, "smt_overrides": {}, "dense_overrides": {}, "num_test_slides": 90}
    judged |= {"auc_dense": 1.0, "balanced_accuracy_dense": 0.95}
    judged |= {"auc_smt_k4": 0.9, "balanced_accuracy_smt_k4": 0.9}
    judged |= {"dense_minus_smt_points_k4": 5.0, "dense_minus_smt_auc_points_k4": 10.0}
    assert (
        "balanced accuracy at each model's validated threshold: dense - SMT = 5.0 points (AUC: 10.0 points), "
        "**missed**" in "\n".join(accuracy_section(judged))
    )
    assert f"plus the testing splits of `{other.resolve()}`" in section
    monkeypatch.chdir(tmp_path)  # folders given relative to the working directory, as on a command line
    relative = held_out_cohort(Path("work2"), 0, 0, 0, 0, None, "mine", ["scanner2/datalist.json"])[1]
    entries = load_datalist(relative, "testing", str(relative.parent))
    assert len(entries) == 4
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in entries)
    with pytest.raises(OptionError, match="no such datalist"):
        held_out_cohort(tmp_path / "work", 0, 0, 0, 0, dataset_dir=tmp_path)
    missing = tmp_path / "elsewhere" / "datalist.json"
    args = ["benchmark", "accuracy", "--dataset-dir", str(own.parent), "--test-datalist", str(missing)]
    assert main([*args, "--work-dir", str(tmp_path / "work")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {missing}: no such datalist (a cohort folder holds datalist.json)"
    )


def _ablation_result(chosen: dict[str, list[int]], ks: list[int], **same: object) -> dict:
    result = {
        "cohort": "c",
        "num_slides": 8,
        "slide_size": 1024,
        "cohort_digest": "d",
        "smt_overrides": {"grid": 4},
        **same,
    }
    grid = variants()
    result["variants"] = {
        name: {"overlays": list(grid[name].overlays), "overrides": grid[name].overrides, "seeds": s}
        for name, s in chosen.items()
    }
    result["seeds"] = sorted({s for seeds in chosen.values() for s in seeds})
    result["k_sweep"] = [{"k": k, "balanced_accuracy": 0.1 * k} for k in ks]
    return result


def test_merge_ablation_adds_up_subsets_of_one_cohort() -> None:
    names = list(variants())
    previous = _ablation_result({names[5]: [0], names[0]: [0], names[1]: [0]}, [1, 4], command="first")
    previous["variants"][names[1]]["overrides"] = {"focus_weight": [1.0, 1.0]}  # since defined otherwise
    current = _ablation_result({names[5]: [0, 1, 2], names[3]: [0]}, [4, 8])
    current["k_sweep"][0]["balanced_accuracy"] = 0.9
    merged = merge_ablation(previous, current)
    assert list(merged["variants"]) == [names[0], names[3], names[5]]  # table order, the stale one dropped
    assert merged["variants"][names[5]]["seeds"] == [0, 1, 2] and merged["seeds"] == [0, 1, 2]
    assert [(p["k"], p["balanced_accuracy"]) for p in merged["k_sweep"]] == [(1, 0.1), (4, 0.9), (8, 0.8)]
    assert merged["merged_commands"] == ["first"]
    for other in (
        _ablation_result({names[0]: [0]}, [1], smt_overrides={"grid": 8}),
        _ablation_result({names[0]: [0]}, [1], cohort_digest="another cohort drawn under the same name"),
    ):
        assert list(merge_ablation(other, _ablation_result({names[3]: [0]}, [4]))["variants"]) == [names[3]]


def test_merge_ablation_adds_seeds_run_at_different_times() -> None:
    name = next(iter(variants()))
    where = {"model": dict.fromkeys(CATEGORIES, 0.0), "random": dict.fromkeys(CATEGORIES, 0.0)}

    def run(seeds: list[int], accuracy: list[float]) -> dict:
        result = _ablation_result({name: seeds}, [])
        result["variants"][name].update(
            per_seed=[{"balanced_accuracy": a} for a in accuracy],
            per_seed_landing=[
                {g: {"layer1": where, "layer2": where} for g in ("positive", "negative")} for _ in seeds
            ],
        )
        return result

    merged = merge_ablation(run([0, 1], [0.5, 0.7]), run([1, 2], [0.9, 1.0]))["variants"][name]
    assert merged["seeds"] == [0, 1, 2]  # seed 1 run again: its new figure replaces the old one
    assert [r["balanced_accuracy"] for r in merged["per_seed"]] == [0.5, 0.9, 1.0]
    assert merged["balanced_accuracy"]["mean"] == pytest.approx(0.8)
    assert len(merged["per_seed_landing"]) == 3


def test_report_shows_ablation_grids_with_chance_and_landing(tmp_path: Path) -> None:
    names = list(variants())
    landing = {"model": dict.fromkeys(CATEGORIES, 0.25), "random": dict.fromkeys(CATEGORIES, 0.25)}
    files = []
    for contrast in (0.0, 0.75):
        result = _ablation_result({names[5]: [0, 1], names[8]: [0]}, [4], low_mag_tumour_contrast=contrast)
        result |= {"smt_overlays": ["cpu.yaml"], "extra_test_slides": 0}
        for entry in result["variants"].values():
            entry |= {"auc": {"mean": 0.9, "std": 0.01}, "focus_hit_rate": {"mean": 0.7, "std": 0.1}}
            entry |= {"focus_hit_rate_chance": {"mean": 0.48, "std": 0.0}}
            entry["landing"] = {"positive": {"layer1": landing, "layer2": landing}}
        result["k_sweep"][0] |= {"regions": 21, "auc": 0.9, "focus_hit_rate": 0.7, "seconds_per_slide": 0.1}
        files.append(tmp_path / f"ablation_{contrast}.json")
        files[-1].write_text(json.dumps(result))
    text = write_report(tmp_path / "b.md", None, None, files).read_text()
    assert text.count("## Ablations") == 2 and "**ablation 2**: not run" not in text
    assert "`--low-mag-tumour-contrast 0.75`" in text and "merged over `train.yaml + cpu.yaml`" in text
    row = "| paper: forward + backward | paper.yaml | 0, 1 | 0.900 +- 0.010 | n/a | 0.700 +- 0.100 (0.480) |"
    assert row in text and f"| {names[8]} | paper.yaml; guide: 0.5 |" in text
    assert "### Where the picks land (positive test slides)" in text and "| 0.25 (0.25) |" in text
    assert all((tmp_path / "b" / name).exists() for name in ("accuracy_vs_k.png", "accuracy_vs_k_2.png"))


def test_results_name_the_device_the_bundle_runs_train_on() -> None:
    """The bundle's ``device`` expression (CUDA when there is one) or the override, evaluated: a result says
    where its models were trained, whatever device the benchmark's own process would pick."""
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert bundle_device(["train.yaml", "cpu.yaml"], {}) == expected
    assert bundle_device("paper.yaml", {"device": "$torch.device('cpu')"}) == "cpu"


def test_the_environment_records_bfloat16_and_numpy_simd() -> None:
    """Whether evaluations ran under bfloat16 autocast by default, and what a cohort drawn here depends on."""
    from smt_monai.benchmark.fixtures import environment
    from smt_monai.utils import fast_bf16, numpy_simd

    info = environment("cpu")
    assert info["native_bfloat16"] == fast_bf16("cpu") and info["numpy_simd"] == numpy_simd()


@pytest.mark.slow
def test_an_ablation_without_k_sweep_trains_the_chosen_variants_only(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--ks`` with no value runs a Table-2 subset alone: the default model (the sweep's) is not trained. A
    result file of other slides is refused before any training, not overwritten."""
    work, path = tmp_path / "work", tmp_path / "a.json"
    args = ["benchmark", "ablation", "--quick", "--work-dir", str(work), "--ks", "--json", str(path)]
    assert main([*args, "--variants", "paper: forward + backward"]) == 0
    result = json.loads(path.read_text())
    assert list(result["variants"]) == ["paper: forward + backward"] and result["k_sweep"] == []
    assert result["environment"]["device"] == bundle_device("train.yaml", {})
    trained = sorted(p.parent.parent.name for p in work.glob("runs/*/smt_*/train/model.pt"))
    assert len(trained) == 1, trained  # the variant's run, no default beside it
    assert main([*args, "--variants", "paper: forward + backward"]) == 0  # the same slides: merged
    assert len(json.loads(path.read_text())["merged_commands"]) == 1
    path.write_text(json.dumps({**result, "cohort_digest": "of another cohort under the same name"}))
    capsys.readouterr()
    assert main([*args, "--variants", "paper + exploration"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"error: {path}: holds ablation results of other slides or base configs (cohort_digest differ), "
        "which cannot merge with this run: give another --json" + REDRAWN_COHORT
    )
    assert json.loads(path.read_text())["cohort_digest"] == "of another cohort under the same name"
    assert len(list(work.glob("runs/*/smt_*/train/model.pt"))) == 1  # refused before training


@pytest.mark.parametrize("content", ['{"variants": ', "[1, 2]", "\udcff"])
def test_an_unreadable_result_file_is_one_error_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str
) -> None:
    path, work = tmp_path / "a.json", tmp_path / "work"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    args = ["benchmark", "ablation", "--quick", "--work-dir", str(work), "--ks", "--json", str(path)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {path}: not a benchmark results file (") and "\n" not in error
    assert error.endswith("give another --json")
    assert path.read_bytes() == content.encode("utf-8", "surrogateescape") and not work.exists()


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
    assert accuracy["dense_overrides"]["tile_mpp"] == 1.0  # dense tiles at SMT's layer3_mpp (train.yaml's)
    # dense keeps its best validated epoch and threshold as SMT does (train.yaml validates every epoch)
    assert accuracy["dense_overrides"]["val_interval"] == 1
    assert accuracy["dense_minus_smt_auc_points_k4"] == pytest.approx(
        100 * (accuracy["auc_dense"] - accuracy["auc_smt_k4"])
    )
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
        x0, y0, x1, y1 = tissue_bbox(slide, slide.mpp)
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
    assert any(line.startswith("training on cpu: 2 runs of 2 epochs, every layer") for line in lines)
    assert any(line.startswith("  SMT K=8: ") and "SMT/floor" in line for line in lines)
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["slide_width"] == 4096 and all(speed[k] is not None for k in SPEED_KEYS)
    assert any(line.startswith("cuCIM cuda decoding: ") for line in lines)


def test_the_layer1_probe_trains_each_target_and_measures_held_out_fields(tmp_path: Path) -> None:
    """``scripts/probe_layer1_focus.py`` on a tiny 40x cohort: one result per target and seed, each AUC a
    probability or NaN (a class absent from the tiny slides), hit rate and bound probabilities."""
    import importlib.util

    cohort = make_cohort(tmp_path / "c", 4, 1024, 5, split=(0.5, 0.0, 0.5), workers=1, progress=False)
    script = Path(__file__).resolve().parents[1] / "scripts" / "probe_layer1_focus.py"
    spec = importlib.util.spec_from_file_location("probe", script)
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    args = ["--train", str(cohort), "--test", str(cohort), "--targets", "joint0.1", "suspicious"]
    probe.main([*args, "--seeds", "0", "--epochs", "1", "--layer3-mpp", "0.0625", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["target"], r["seed"]) for r in results] == [("joint0.1", 0), ("suspicious", 0)]
    for result in results:
        for key in ("suspicious_vs_normal_auc", "tumour_vs_normal_auc", "tumour_vs_mimic_auc"):
            assert result[key] != result[key] or 0.0 <= result[key] <= 1.0
        assert 0.0 <= result["hit_rate"] <= 1.0 and 0.0 <= result["mimic_blind_bound"] <= 1.0


def test_accuracy_report_tabulates_recall_by_lesion_size() -> None:
    """metrics.json's recall by lesion size becomes one row per model, a column per bin in the bins' order,
    each cell the recall and the slides found of those in the bin; an empty bin is '-'."""
    from smt_monai.benchmark.accuracy import lesion_figures
    from smt_monai.benchmark.report import lesion_table

    metrics = {
        "auc": 0.9,
        "recall_lesion_up_to_0.3mm": 0.5,
        "slides_lesion_up_to_0.3mm": 2.0,
        "recall_lesion_0.3_to_1mm": 0.75,
        "slides_lesion_0.3_to_1mm": 4.0,
        "recall_lesion_over_1mm": float("nan"),
        "slides_lesion_over_1mm": 0.0,
    }
    figures = lesion_figures(metrics)
    assert list(figures) == ["up_to_0.3mm", "0.3_to_1mm", "over_1mm"]
    assert figures["0.3_to_1mm"] == {"recall": 0.75, "slides": 4.0}
    dense = lesion_figures({**metrics, "recall_lesion_up_to_0.3mm": 1.0})
    table = lesion_table({"lesion_recall_smt_k4": figures, "lesion_recall_dense": dense}, [4, 8])
    assert "| model | up to 0.3 mm | 0.3 to 1 mm | over 1 mm |" in table
    assert "| SMT, K = 4 | 0.50 (1 of 2) | 0.75 (3 of 4) | - |" in table
    assert "| SMT, K = 8 | - | - | - |" in table  # not evaluated with these bins
    assert "| dense | 1.00 (2 of 2) | 0.75 (3 of 4) | - |" in table
    assert lesion_table({}, [4]) == [] and lesion_figures({"auc": 1.0}) == {}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["speed", "--repeats", "0"], "argument --repeats: must be 1 or more, got 0"),
        (["speed", "--sizes", "-5"], "argument --sizes: must be 256 or more, got -5"),
        (["speed", "--device", "cuda:99"], "argument --device: device 'cuda:99': "),
        (["ablation", "--ks", "0"], "argument --ks: must be 1 or more, got 0"),
        (["focus-diagnostic", "--model", "m.pt", "--datalist", "d.json", "--num-focus", "0"], "--num-focus"),
    ],
)
def test_a_benchmark_option_no_run_could_use_is_refused_before_it_starts(
    args: list[str], says: str, capsys: pytest.CaptureFixture
) -> None:
    """Before, ``--repeats 0`` ran the slide and ended in an IndexError, ``--device cuda`` without a GPU in
    torch's AssertionError after minutes of work, and a negative size was timed."""
    from smt_monai.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["benchmark", *args])
    assert stop.value.code == 2
    assert says in capsys.readouterr().err.strip().splitlines()[-1]
