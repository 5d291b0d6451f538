"""Training and evaluating SMT and the dense baseline through the bundle, as a user would.

Each run is a ``monai.bundle`` ``ConfigWorkflow`` of the bundle's own configs (``train.yaml``,
``evaluate.yaml``, ``train_dense.yaml``, ``evaluate_dense.yaml``) with command-line-style overrides, so the
hyper-parameters the benchmarks use are the bundle's defaults unless an override says otherwise. A run
whose output already exists is reused: the ablations share the default model with the accuracy benchmark.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
MERGED_OVER = {"evaluate.yaml": "train.yaml", "evaluate_dense.yaml": "train_dense.yaml"}
"""The evaluation configs are merged over their training config, as a user runs them."""


def config_files(config: str) -> list[str]:
    """The files of ``bundle/configs`` that make up ``config``: the config, after its base if it has one."""
    return [str(CONFIGS / name) for name in (MERGED_OVER.get(config), config) if name]


def bundle_workflow(config: str, run_id: str, overrides: Mapping[str, Any]) -> Any:
    """The initialised ``ConfigWorkflow`` of ``run_id`` in ``bundle/configs/<config>`` with ``overrides``."""
    from monai.bundle import ConfigWorkflow

    flow = ConfigWorkflow(
        config_file=config_files(config),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id=run_id,
        workflow_type=None,
        **dict(overrides),
    )
    flow.initialize()
    return flow


def run_bundle(config: str, run_id: str, overrides: Mapping[str, Any]) -> None:
    """Run ``run_id`` of ``bundle/configs/<config>`` with ``overrides`` (bundle ids to values)."""
    flow = bundle_workflow(config, run_id, overrides)
    flow.run()
    flow.finalize()


def train(config: str, datalist: Path, out: Path, overrides: Mapping[str, Any]) -> Path:
    """Run ``training`` of ``config`` (``train.yaml`` or ``train_dense.yaml``) once per ``out``; returns
    its best ``model.pt``."""
    model = out / "model.pt"
    if not model.exists():
        run_bundle(
            config, "training", {"dataset_dir": str(datalist.parent), "output_dir": str(out), **overrides}
        )
    return model


def evaluate(
    config: str, datalist: Path, model: Path, out: Path, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Run ``evaluating`` of ``config`` (``evaluate.yaml`` or ``evaluate_dense.yaml``) on the testing split
    once per ``out``; returns its ``metrics.json``."""
    metrics = out / "metrics.json"
    if not metrics.exists():
        overrides = {"datalist": str(datalist), "ckpt_path": str(model), "output_dir": str(out), **overrides}
        run_bundle(config, "evaluating", overrides)
    return json.loads(metrics.read_text())


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["max_epochs=10", "focus_weight=[1.0, 1.0]"]`` to bundle overrides (JSON values parsed)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run_dir(work_dir: Path, datalist: Path, kind: str, overrides: Mapping[str, Any]) -> Path:
    """A folder per cohort, method and set of overrides, so a changed setting never reuses a stale run."""
    key = hashlib.sha1(json.dumps(dict(overrides), sort_keys=True).encode()).hexdigest()[:10]
    return work_dir / "runs" / datalist.parent.name / f"{kind}_{key}"
