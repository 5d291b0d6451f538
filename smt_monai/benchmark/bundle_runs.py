"""Training and evaluating SMT and the dense baseline through the bundle, as a user would.

Each run is a ``monai.bundle`` ``ConfigWorkflow`` of the bundle's own configs (``train.yaml``,
``evaluate.yaml``, ``train_dense.yaml``, ``evaluate_dense.yaml``, and overlays merged over them such as
``cpu.yaml`` and ``paper.yaml``) with command-line-style overrides, so the hyper-parameters the benchmarks
use are the bundle's unless an override says otherwise. A run whose output already exists is reused: the
ablations share the default model with the accuracy benchmark.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
MERGED_OVER = {
    "evaluate.yaml": "train.yaml",
    "cpu.yaml": "train.yaml",
    "paper.yaml": "train.yaml",
    "evaluate_dense.yaml": "train_dense.yaml",
}
"""The configs merged over another, as a user runs them: that one comes first when it is not given."""

Configs = str | Sequence[str]
"""Config files of ``bundle/configs`` merged in order: a list, or names joined by ``+``
(``"train.yaml+paper.yaml"``)."""


def config_names(config: Configs) -> list[str]:
    """The names of ``config`` in merge order, each preceded by its base (``MERGED_OVER``) unless that
    comes earlier: ``"paper.yaml+evaluate.yaml"`` is ``["train.yaml", "paper.yaml", "evaluate.yaml"]``."""
    names: list[str] = []
    for name in config.split("+") if isinstance(config, str) else config:
        base = MERGED_OVER.get(name)
        if base is not None and base not in names:
            names.append(base)
        names.append(name)
    return names


def config_files(config: Configs) -> list[str]:
    """The files of ``bundle/configs`` that make up ``config`` (:func:`config_names`)."""
    return [str(CONFIGS / name) for name in config_names(config)]


def config_value(config: Configs, key: str) -> Any:
    """The raw value of ``key`` (``#`` for nesting) in the merged ``config``: references and expressions
    unresolved, as an override takes them."""
    return copy.deepcopy(_merged(tuple(config_names(config))).get(key))


def bundle_device(config: Configs, overrides: Mapping[str, Any]) -> str:
    """The device the bundle runs of ``config`` train and evaluate on: its ``device`` expression (CUDA when
    there is one) or the override, evaluated here, so a benchmark says where its figures were made."""
    from monai.bundle import ConfigParser

    value = overrides.get("device", config_value(config, "device"))
    return str(ConfigParser({"device": value}).get_parsed_content("device"))


@functools.lru_cache(maxsize=16)
def _merged(names: tuple[str, ...]) -> Any:
    """The ``ConfigParser`` of the merged configs ``names``, parsed once per process (the files are the
    package's own)."""
    from monai.bundle import ConfigParser

    return ConfigParser(ConfigParser.load_config_files(config_files(list(names))))


def bundle_workflow(config: Configs, run_id: str, overrides: Mapping[str, Any]) -> Any:
    """The initialised ``ConfigWorkflow`` of ``run_id`` in the merged ``config`` with ``overrides``."""
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


def run_bundle(config: Configs, run_id: str, overrides: Mapping[str, Any]) -> None:
    """Run ``run_id`` of the merged ``config`` with ``overrides`` (bundle ids to values)."""
    flow = bundle_workflow(config, run_id, overrides)
    flow.run()
    flow.finalize()


def train(config: Configs, datalist: Path, out: Path, overrides: Mapping[str, Any]) -> Path:
    """Run ``training`` of ``config`` (``train.yaml`` or ``train_dense.yaml``, with any overlays) once per
    ``out``; returns its best ``model.pt``."""
    model = out / "model.pt"
    if not model.exists():
        run_bundle(
            config, "training", {"dataset_dir": str(datalist.parent), "output_dir": str(out), **overrides}
        )
    return model


def evaluate(
    config: Configs, datalist: Path, model: Path, out: Path, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Run ``evaluating`` of ``config`` (ending in ``evaluate.yaml`` or ``evaluate_dense.yaml``) on the
    testing split once per ``out``; returns its ``metrics.json``."""
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


def run_dir(
    work_dir: Path, datalist: Path, kind: str, overrides: Mapping[str, Any], overlays: Sequence[str] = ()
) -> Path:
    """A folder per cohort, method, overlays (configs merged over the method's own) and overrides, so a
    changed setting never reuses a stale run. Without overlays the key is that of the overrides alone."""
    settings: Any = (
        dict(overrides) if not overlays else {"overlays": list(overlays), "overrides": dict(overrides)}
    )
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return work_dir / "runs" / datalist.parent.name / f"{kind}_{key}"
