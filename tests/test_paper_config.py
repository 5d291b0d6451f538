"""``bundle/configs/paper.yaml``, the paper's method as written (Sec. 3-4.1): it trains end to end through
``monai.bundle`` on tiny slides, and what trains is the paper's optimiser, schedule and losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, write_cohort
from monai.bundle import ConfigParser
from monai.handlers import LrScheduleHandler

from smt_monai.benchmark.bundle_runs import bundle_workflow, config_files

PAPER = ["train.yaml", "paper.yaml"]


def test_paper_defaults_follow_the_run_length() -> None:
    """Layers 2 and 3 start at 20% and 50% of the epochs and the weights ramp over 20%: the paper's 20th
    and 50th of 100 epochs, and the same shares of cpu.yaml's 80."""
    for configs, expected in (
        (PAPER, ([1, 20, 50], 20)),
        (["train.yaml", "cpu.yaml", "paper.yaml"], ([1, 16, 40], 16)),
    ):
        parser = ConfigParser(ConfigParser.load_config_files(config_files(configs)))
        assert (
            parser.get_parsed_content("start_epoch"),
            parser.get_parsed_content("ramp_epochs"),
        ) == expected
    parser = ConfigParser(ConfigParser.load_config_files(config_files(PAPER)))
    assert parser.get_parsed_content("num_focus") == 4 and parser.get_parsed_content("batch_size") == 4
    assert parser.get_parsed_content("max_epochs") == 100


@pytest.mark.slow
def test_paper_config_trains_end_to_end_with_the_papers_settings(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data")
    flow = bundle_workflow(
        PAPER,
        "training",
        {
            **TINY_OVERRIDES,
            "dataset_dir": str(datalist.parent),
            "output_dir": str(tmp_path / "run"),
            "max_epochs": 2,
        },
    )
    get = flow.parser.get_parsed_content
    trainer = get("train#trainer")
    flow.run()
    assert trainer.state.epoch == 2 and (tmp_path / "run" / "model.pt").exists()

    # Sec. 4.1: SGD, momentum 0.9, weight decay 5e-4, lr 0.002 / 0.002 / 0.01, constant over the run
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.SGD and optimizer is get("optimizer")
    assert [g["lr"] for g in optimizer.param_groups] == [0.002, 0.002, 0.01]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in optimizer.param_groups)
    scheduler = get("lr_scheduler")
    assert type(scheduler) is torch.optim.lr_scheduler.ConstantLR and scheduler.last_epoch == 2
    handler = get("train#handlers")[0]
    assert isinstance(handler, LrScheduleHandler) and handler.lr_scheduler is scheduler
    assert get("model_card").training["learning_rates"] == [0.002, 0.002, 0.01]

    # the schedule: 20% and 50% of 2 epochs start layers 2 and 3 at once, with the weights at 1 and 0.1
    assert get("start_epoch") == [1, 1, 1] and trainer.state.num_layers == 3
    assert trainer.state.lambda_fwd == [1.0, 1.0, 1.0] and trainer.state.lambda_bwd == [0.1, 0.1]

    # Eq. 1-7: plain cross-entropy, L_focus at weight 1, L_ret and L_emb, L_F training the predictors only
    loss, cascade, network = get("loss"), get("cascade"), get("network")
    assert [c.class_balanced for c in loss.classification] == [False, False, False]
    assert loss.focus_weight == (1.0, 1.0) and loss.recheck_weight == loss.distillation_weight == 1.0
    assert not network.layer1.focus_grad_to_encoder and not network.layer2.focus_grad_to_encoder
    assert {"cls3", "focus1", "focus2", "ret1", "ret2", "emb1", "emb2"} <= set(trainer.state.output)
    # Sec. 3.1-3.3: top-K by q, no exploration, guidance or flips, the extra benign region, eps 0.9
    assert (cascade.focus_source, cascade.explore, cascade.guide, cascade.augment) == ("q", 0.0, 0.0, False)
    assert cascade.extra_benign and cascade.bank.eps == 0.9
