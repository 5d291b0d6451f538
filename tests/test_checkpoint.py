"""Checkpoints on real MONAI/Ignite engines: a process killed mid-save, resume, the best model kept.

The training here is a tiny linear model trained by MONAI's ``SupervisedTrainer`` with a real optimiser and
schedule, validated every epoch by a ``SupervisedEvaluator`` whose key score is scripted per epoch, so that
ties and worse epochs happen where a test needs them. Run as a script, this file trains one such run
(the process a test kills).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from smt_monai.handlers import BestModelCheckpoint, CheckpointError, TrainingCheckpoint
from smt_monai.handlers.checkpoint import checkpoints
from smt_monai.utils import remove_stale_temporaries

SCORES = {1: 0.5, 2: 0.8, 3: 0.6, 4: 0.7}  # the best is epoch 2: worse epochs after a resume must keep it


class ScriptedScore:
    """Sets the evaluator's ``score`` metric to ``scores[epoch]`` (attach before the best-model saver)."""

    def __init__(self, scores: dict[int, float]) -> None:
        self.scores = scores

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(score=self.scores[e.state.epoch])
        )


def training(
    out: Path, max_epochs: int, resume: bool = False, scores: dict | None = None, run: str = ""
) -> Engine:
    """A trainer with the checkpoint handlers in the bundle's order: schedule step, checkpoint, validation."""
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import LrScheduleHandler, ValidationHandler

    torch.manual_seed(0)
    network = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(network.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    data = [{"image": torch.randn(8, 4), "label": torch.randn(8, 2)} for _ in range(3)]
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=data[:1],
        network=network,
        val_handlers=[
            ScriptedScore(scores or SCORES),
            BestModelCheckpoint(
                out, network, metric_name="score", resume=resume, metadata=lambda: {"run": run}
            ),
        ],
    )
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=data,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        train_handlers=[
            LrScheduleHandler(schedule, print_lr=False),
            TrainingCheckpoint(out, network, optimizer, schedule, resume=resume),
            ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
        ],
    )
    return trainer


def _slow_save_of(epoch: int) -> None:
    """Make ``torch.save`` of epoch ``epoch``'s checkpoint write half its bytes, then stall (to be killed)."""
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs) -> None:
        if not Path(str(f)).name.startswith(f".checkpoint_epoch={epoch}.pt.tmp"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as fh:
            fh.write(buffer.getvalue()[: buffer.tell() // 2])
            fh.flush()
            time.sleep(600)

    torch.save = slow_save


def _model(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)


def test_kill_during_save_then_resume_continues_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    log = tmp_path / "child.log"
    with open(log, "w") as stderr:
        child = subprocess.Popen([sys.executable, __file__, str(out), "4", "3"], stderr=stderr)
    deadline = time.monotonic() + 300
    while (
        not [p for p in out.glob(".checkpoint_epoch=3.pt.tmp*") if p.stat().st_size] and child.poll() is None
    ):
        assert time.monotonic() < deadline, "the epoch-3 save never started"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, log.read_text()[-2000:]
    assert [p.name for _, p in checkpoints(out)] == ["checkpoint_epoch=2.pt"]
    assert len(list(out.glob(".checkpoint_epoch=3.pt.tmp*"))) == 1
    assert _model(out)["best_epoch"] == 2

    trainer = training(out, max_epochs=4, resume=True)
    restored: dict = {}

    @trainer.on(Events.STARTED)  # after the checkpoint handler's restore
    def _snapshot(engine: Engine) -> None:
        restored["epoch"] = engine.state.epoch
        restored["steps"] = [int(s["step"]) for s in engine.optimizer.state.values()]

    trainer.run()
    assert restored == {"epoch": 2, "steps": [6, 6]}  # two epochs of three iterations came back
    assert not list(out.glob(".*tmp*"))  # the killed run's temporary file was removed
    assert [p.name for _, p in checkpoints(out)] == ["checkpoint_epoch=4.pt"]

    uninterrupted = training(tmp_path / "full", max_epochs=4)
    uninterrupted.run()
    for key, value in uninterrupted.network.state_dict().items():
        torch.testing.assert_close(trainer.network.state_dict()[key], value)
    best, reference = _model(out), _model(tmp_path / "full")
    assert (
        (best["best_epoch"], best["best_metric"])
        == (reference["best_epoch"], reference["best_metric"])
        == (2, 0.8)
    )
    for key, value in reference["model"].items():
        torch.testing.assert_close(best["model"][key], value)


def test_resume_passes_over_a_corrupt_newer_checkpoint_and_a_tie_keeps_the_earlier_best(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Epoch 3 ties epoch 2 and replaces it (ties go to the later epoch); re-run after a resume that fell
    back to epoch 2, the same epoch 3 does not replace the model it gave the first time."""
    out, scores = tmp_path / "run", {1: 0.5, 2: 0.8, 3: 0.8}
    training(out, max_epochs=2, scores=scores, run="first").run()
    kept = (out / "checkpoint_epoch=2.pt").read_bytes()
    training(out, max_epochs=3, resume=True, scores=scores, run="first").run()
    assert (_model(out)["best_epoch"], _model(out)["run"]) == (3, "first")
    (out / "checkpoint_epoch=2.pt").write_bytes(kept)
    newest = out / "checkpoint_epoch=3.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged on disk

    with caplog.at_level(logging.WARNING, logger="smt_monai.handlers.checkpoint"):
        trainer = training(out, max_epochs=3, resume=True, scores=scores, run="second")
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "smt_monai.handlers.checkpoint" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "truncated or corrupt" in warnings[0]
    trainer.run()
    assert trainer.state.epoch == 3
    assert (_model(out)["best_epoch"], _model(out)["run"]) == (3, "first")


def test_resume_without_a_loadable_checkpoint_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"run: no checkpoint_epoch=N.pt to resume from"):
        training(tmp_path / "run", max_epochs=2, resume=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint_epoch=1.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run: none of its 1 checkpoint_epoch=N.pt loads") as info:
        training(tmp_path / "run", max_epochs=2, resume=True)
    assert "\n" not in str(info.value)


def test_best_model_ties_go_later_metadata_is_saved_and_inference_loads_it(tmp_path: Path) -> None:
    from smt_monai.inference import ModelCard, load_model
    from smt_monai.networks import smt_tiny

    network = smt_tiny()
    card = ModelCard.for_training(network, "tiny", ["benign", "tumour"])
    evaluator = Engine(lambda e, b: None)
    ScriptedScore({1: 0.4, 2: 0.9, 3: 0.9, 4: 0.2}).attach(evaluator)
    BestModelCheckpoint(tmp_path, network, metric_name="score", metadata=card.metadata).attach(evaluator)
    evaluator.run([0], max_epochs=4)
    saved = _model(tmp_path)
    assert set(saved) == {"model", "best_metric", "best_epoch", "metrics", "smt_monai"}
    assert (saved["best_epoch"], saved["best_metric"], saved["metrics"]) == (3, 0.9, {"score": 0.9})
    loaded = load_model(tmp_path / "model.pt")
    torch.testing.assert_close(loaded.layer3.head.weight, network.layer3.head.weight)
    assert ModelCard.of(loaded).validation == {"best_metric": 0.9, "best_epoch": 3, "metrics": {"score": 0.9}}
    assert ModelCard.of(loaded).threshold == 0.5  # no decision threshold chosen on validation
    saved["metrics"]["decision_threshold"] = 0.73
    torch.save(saved, tmp_path / "tuned.pt")
    assert ModelCard.of(load_model(tmp_path / "tuned.pt")).threshold == 0.73

    clash = Engine(lambda e, b: None)
    ScriptedScore({1: 0.5}).attach(clash)
    BestModelCheckpoint(tmp_path / "x", network, metric_name="score", metadata={"best_epoch": 0}).attach(
        clash
    )
    with pytest.raises(ValueError, match="metadata may not use the keys"):
        clash.run([0])


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    names = [
        f".checkpoint_epoch=3.pt.tmp{pid}",
        f".focus.nii.gz.tmp{pid}.nii.gz",
        ".model.pt.tmp1",  # init: alive
        f".score_bank.pt.tmp{os.getpid()}",  # this process
        "checkpoint_epoch=2.pt",
        ".hidden",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_stale_temporaries(tmp_path / "nowhere") == []


if __name__ == "__main__":
    # python test_checkpoint.py OUT MAX_EPOCHS SLOW_EPOCH: train, stalling in the save of SLOW_EPOCH
    _slow_save_of(int(sys.argv[3]))
    training(Path(sys.argv[1]), max_epochs=int(sys.argv[2])).run()
