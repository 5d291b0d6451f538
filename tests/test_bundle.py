"""The bundle through ``monai.bundle``, as the model zoo's CI runs bundles: train, resume, evaluate, infer,
export, and the checks a user hits first (metadata, datalist problems)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, write_cohort
from monai.bundle import ConfigWorkflow

from smt_monai.benchmark.bundle_runs import bundle_workflow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"


def workflow(config: str, run_id: str, **overrides) -> ConfigWorkflow:
    return bundle_workflow(config, run_id, {**TINY_OVERRIDES, **overrides})


def part(flow: ConfigWorkflow, config_id: str):
    """A component of an initialised workflow (e.g. ``train#trainer``)."""
    return flow.parser.get_parsed_content(config_id)


def bundle_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, cwd=ROOT
    )


def overrides_cli(**values) -> list[str]:
    out = []
    for key, value in {**TINY_OVERRIDES, **values}.items():
        out += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return out


def test_metadata_verifies_against_the_schema() -> None:
    result = bundle_cli(
        "verify_metadata",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--filepath",
        str(ROOT / "tests" / "data" / "meta_schema_20240725.json"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_datalist_problems_fail_at_start_listing_all(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data", count=4, splits=(2, 1, 1))
    content = json.loads(datalist.read_text())
    content["training"].append({"image": "nowhere.tif", "label": 1})
    content["training"].append({"image": "slide_0.tif"})
    content["training"].append({"image": content["training"][0]["image"], "label": 5})
    datalist.write_text(json.dumps(content))
    result = bundle_cli(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.yaml"),
        "--dataset_dir",
        str(datalist.parent),
        "--output_dir",
        str(tmp_path / "run"),
    )
    assert result.returncode != 0
    assert "nowhere.tif" in result.stderr and "missing key 'label'" in result.stderr
    assert "3 problem(s)" in result.stderr
    assert "label 5 is not one of the model's 2 classes (0 to 1)" in result.stderr


@pytest.mark.slow
def test_train_interrupt_resume_matches_uninterrupted(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data")
    common = {
        "dataset_dir": str(datalist.parent),
        "start_epoch": [1, 2, 2],
        "ramp_epochs": 1,
        "num_workers": 1,
    }

    full = workflow("train.yaml", "training", output_dir=str(tmp_path / "full"), max_epochs=3, **common)
    full.run()
    assert part(full, "train#trainer").state.epoch == 3

    first = workflow("train.yaml", "training", output_dir=str(tmp_path / "cut"), max_epochs=2, **common)
    first.run()
    saved_network = {k: v.clone() for k, v in part(first, "network").state_dict().items()}
    saved_bank = part(first, "score_bank").state_dict()
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint_epoch=*.pt")) == [
        "checkpoint_epoch=2.pt"
    ]

    resumed = workflow(
        "train.yaml", "training", output_dir=str(tmp_path / "cut"), max_epochs=3, resume=True, **common
    )
    trainer = part(resumed, "train#trainer")
    restored: dict = {}
    from ignite.engine import Events

    @trainer.on(Events.EPOCH_STARTED(once=3))
    def _snapshot(engine) -> None:
        restored["network"] = {k: v.clone() for k, v in part(resumed, "network").state_dict().items()}
        restored["bank"] = part(resumed, "score_bank").state_dict()
        restored["momentum"] = len(part(resumed, "optimizer").state)
        restored["schedule_steps"] = part(resumed, "lr_scheduler").last_epoch

    resumed.run()
    assert trainer.state.epoch == part(full, "train#trainer").state.epoch == 3
    assert trainer.state.iteration == part(full, "train#trainer").state.iteration
    for key, value in saved_network.items():
        torch.testing.assert_close(restored["network"][key], value)
    assert restored["bank"]["keys"] == saved_bank["keys"]
    torch.testing.assert_close(restored["bank"]["scores"], saved_bank["scores"])
    assert restored["momentum"] > 0  # the optimiser's moment buffers came back with it
    assert restored["schedule_steps"] == 2  # the learning-rate schedule continues after two epochs
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint_epoch=*.pt")) == [
        "checkpoint_epoch=3.pt"
    ]
    events = list((tmp_path / "full").glob("events.out.tfevents.*"))
    assert events, "TensorBoard event files are written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for tag in (
        "cls1",
        "cls3",
        "ret1",
        "emb1",
        "focus2",
        "lambda_fwd2",
        "lambda_bwd1",
        "accuracy3",
        "positive3",
        "loss",
    ):
        assert tag in tags, tag
    for tag in (
        "balanced_accuracy",
        "balanced_accuracy_layer1",
        "auc",
        "focus_top1",
        "focus_hit_rate_chance",
    ):
        assert tag in tags, tag


@pytest.mark.slow
def test_evaluate_infer_and_export_from_the_command_line(tmp_path: Path) -> None:
    """Train (with the Cox risk head, on a datalist where some slides give survival), evaluate, export,
    infer: the concordance index ranks by the risk head; predictions.csv has a risk column, eager and
    scripted."""
    datalist = write_cohort(tmp_path / "data")
    lists = json.loads(datalist.read_text())
    for i, entry in enumerate(lists["training"][1:] + lists["validation"] + lists["testing"]):
        entry.update(time=10.0 - 3 * entry["label"] + i, event=int(i % 3 != 2))  # the first slide: none
    datalist.write_text(json.dumps(lists))
    run = tmp_path / "run"
    result = bundle_cli(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.yaml"),
        "--dataset_dir",
        str(datalist.parent),
        "--output_dir",
        str(run),
        *overrides_cli(max_epochs=2, start_epoch=[1, 1, 1], risk_head=True),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "model.pt").exists()

    evaluation = tmp_path / "eval"
    result = bundle_cli(
        "run",
        "evaluating",
        "--config_file",
        json.dumps([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")]),
        "--datalist",
        str(datalist),
        "--ckpt_path",
        str(run / "model.pt"),
        "--output_dir",
        str(evaluation),
        *overrides_cli(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    for key in ("balanced_accuracy", "auc", "balanced_accuracy_layer1", "focus_hit_rate", "focus_top1"):
        assert key in metrics
    assert metrics["num_slides"] == 2 and metrics["seconds_per_slide"] > 0
    assert metrics["concordance_index"] in (0.0, 1.0)  # two slides with survival: one comparable pair
    # the positive testing slide's tumour, a 102 px square at 0.5 um/px, is 0.07 mm across
    assert (metrics["slides_lesion_up_to_0.2mm"], metrics["slides_lesion_0.2_to_2mm"]) == (1, 0)
    assert metrics["recall_lesion_up_to_0.2mm"] in (0.0, 1.0)

    exported = tmp_path / "model.ts"
    result = bundle_cli(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(run / "model.pt"),
        "--key_in_ckpt",
        "model",
        "--ckpt_path",
        str(run / "model.pt"),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        str(CONFIGS / "inference.yaml"),
        *overrides_cli(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = {}
    for name, model in (("eager", run / "model.pt"), ("script", exported)):
        result = bundle_cli(
            "run",
            "inference",
            "--config_file",
            str(CONFIGS / "inference.yaml"),
            "--datalist",
            str(datalist),
            "--ckpt_path",
            str(model),
            "--output_dir",
            str(tmp_path / name),
            *overrides_cli(),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = (tmp_path / name / "predictions.csv").read_text().splitlines()
    # the same decisions; the same probabilities within bfloat16's precision (autocast on CPUs with native
    # bfloat16 and on CUDA, where the scripted graph may round differently)
    eager, script = (list(csv.DictReader(outputs[name])) for name in ("eager", "script"))
    decided = ("image", "status", "error", "label", "prediction", "class")
    assert [[r[k] for k in decided] for r in eager] == [[r[k] for k in decided] for r in script]
    for a, b in zip(eager, script, strict=True):
        assert float(a["prob_class_1"]) == pytest.approx(float(b["prob_class_1"]), abs=1e-2)
    assert len(outputs["eager"]) == 3  # header + the 2 testing slides
    for rows in outputs.values():
        risks = [row["risk"] for row in csv.DictReader(rows)]
        assert len(risks) == 2 and all(np.isfinite(float(r)) for r in risks)


def test_nan_loss_stops_training_naming_iteration_and_slides(tmp_path: Path) -> None:
    from smt_monai.engines import TrainingDivergedError

    datalist = write_cohort(tmp_path / "data", count=4, splits=(2, 1, 1))
    flow = workflow(
        "train.yaml",
        "training",
        dataset_dir=str(datalist.parent),
        output_dir=str(tmp_path / "run"),
        max_epochs=1,
        val_interval=5,
    )
    with torch.no_grad():
        part(flow, "network").layer1.head.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError) as info:  # monai.bundle wraps what the run raises
        flow.run()
    cause = info.value.__cause__
    assert isinstance(cause, TrainingDivergedError)
    assert re.search(r"iteration 1; slides: .*slide_\d\.tif", str(cause))


def test_unreadable_slide_is_skipped_not_fatal(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data", count=4, splits=(3, 1, 0))
    broken = datalist.parent / "slide_2.tif"
    broken.write_bytes(broken.read_bytes()[:2000])  # truncated after the header
    flow = workflow(
        "train.yaml",
        "training",
        dataset_dir=str(datalist.parent),
        output_dir=str(tmp_path / "run"),
        max_epochs=1,
        val_interval=5,
    )
    flow.run()
    trainer = part(flow, "train#trainer")
    assert trainer.state.epoch == 1
    assert [path for _, path in trainer.state.skipped_slides] == [str(broken)]
    assert np.isfinite(trainer.state.output["loss"])


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data")
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run",
        "training", "--config_file", f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'multi_gpu_train.yaml'}']",
        "--dataset_dir", str(datalist.parent), "--output_dir", str(run),
        *overrides_cli(max_epochs=2, start_epoch=[1, 1, 2], ramp_epochs=1),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert (run / "checkpoint_epoch=2.pt").exists() and (run / "model.pt").exists()
    assert (run / "score_bank.pt").exists()
    writers = {p.name.split(".")[4] for p in run.glob("events.out.tfevents.*")}
    assert len(writers) == 1, "only rank 0 writes TensorBoard events"
    assert "[1/1]" in log  # 4 training slides, 2 processes, batch 2: one iteration per process and epoch
    assert log.count("Epoch[2] Metrics") == 1  # validation on rank 0 only


def test_an_unknown_aggregation_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A bad ``--aggregation`` ends the bundle run with the option's one line, not a library traceback."""
    datalist = write_cohort(tmp_path / "data", count=2, splits=(1, 0, 1))
    configs = f"['{CONFIGS / 'train_dense.yaml'}','{CONFIGS / 'evaluate_dense.yaml'}']"
    result = bundle_cli(
        "run", "evaluating", "--config_file", configs, "--datalist", str(datalist),
        "--output_dir", str(tmp_path / "eval"), "--aggregation", "mean",
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: dense aggregation must be one of ('attention', 'max'), got 'mean'" in result.stderr
    assert "Traceback" not in result.stderr


def test_training_on_a_device_this_machine_lacks_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """``--device cuda:99`` (or ``cuda`` on a machine without a GPU) stops training before it starts, naming
    the device, instead of a traceback from inside torch's ``.to`` (train_dense.yaml and multi_gpu_train.yaml
    build their network by the same line)."""
    write_cohort(tmp_path / "data", count=2, splits=(1, 0, 1))
    result = bundle_cli(
        "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
        "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--device", "cuda:99",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: device 'cuda:99': ")
    assert "Traceback" not in result.stderr
