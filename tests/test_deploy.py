"""The MONAI Deploy app: run locally as a subprocess, it writes what the bundle's predictor writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_cohort

from smt_monai.data import load_slide_list
from smt_monai.inference import ModelCard, SlideListPredictor, load_model
from smt_monai.networks import SMT

SDK_CORE = pytest.importorskip("monai.deploy.core", reason="needs the deploy extra: pip install -e .[deploy]")

from smt_monai.deploy import (  # noqa: E402
    DeployError,
    check_smt_export,
    options_from_env,
    slide_entries,
    torchscript_model,
)
from smt_monai.deploy.__main__ import main  # noqa: E402

TIMING_COLUMNS = {"read_s", "compute_s", "total_s"}
SLIDE_OUTPUTS = ("focus.geojson", "overlay.png", "gallery.jpg", "focus_map.nii.gz", "result.json")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny slides in a folder, and an untrained tiny SMT with its model card, exported to TorchScript."""
    root = tmp_path_factory.mktemp("deploy")
    write_cohort(root / "slides", count=2)
    torch.manual_seed(0)
    model = SMT(preset="tiny", grid=4, patch_size=16).eval()
    model.card = ModelCard.for_training(model, "tiny", ["benign", "tumour"], num_focus=2).to_json()
    torch.jit.script(model).save(str(root / "model.ts"))
    return root / "slides", root / "model.ts"


def run_app(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m smt_monai.deploy ARGS`` on the CPU (the in-process reference runs there too)."""
    return subprocess.run(
        [sys.executable, "-m", "smt_monai.deploy", *args],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    """``predictions.csv`` rows without the timing columns, which differ from run to run."""
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_app_writes_what_the_predictor_writes(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    slides, model = cohort
    out = tmp_path / "app"
    result = run_app("-i", str(slides), "-o", str(out), "-m", str(model))  # K = 2 from the model card
    assert result.returncode == 0, result.stderr[-3000:]

    reference = tmp_path / "reference"
    network = load_model(model)
    SlideListPredictor(network, load_slide_list(slides), reference, progress=False).run()

    rows = read_rows(out / "predictions.csv")
    assert [Path(r["image"]).name for r in rows] == ["slide_0.tif", "slide_1.tif"]
    assert all(r["status"] == "ok" for r in rows)
    assert rows == read_rows(reference / "predictions.csv")
    assert (out / "summary.json").is_file()
    for row in rows:
        folder = out / Path(row["image"]).stem
        assert all((folder / name).is_file() for name in SLIDE_OUTPUTS), folder


def test_missing_model_exits_with_reason(
    cohort: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    slides, _ = cohort
    missing = tmp_path / "missing.ts"
    argv = ["smt_monai.deploy", "-i", str(slides), "-o", str(tmp_path / "out"), "-m", str(missing)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code != 0
    assert f"No such file/folder: PosixPath('{missing}')" in capsys.readouterr().err


def test_model_path_without_torchscript_is_refused(tmp_path: Path) -> None:
    not_a_model = tmp_path / "model.ts"
    not_a_model.write_text("not a model")
    with pytest.raises(DeployError, match="no TorchScript model found"):
        torchscript_model(SDK_CORE.AppContext({"model": str(not_a_model)}))


def test_geometry_comes_from_the_model(cohort: tuple[Path, Path]) -> None:
    _, model = cohort
    network = torchscript_model(SDK_CORE.AppContext({"model": str(model)})).predictor
    assert network.read_size == 32  # grid 4 x patch 16, read pooled by the tiny stem_pool 2
    assert (network.geometry, network.layer3_mpp) == ("physical", 1.0)
    assert ModelCard.of(network).class_names == ["benign", "tumour"]
    check_smt_export(network)
    with pytest.raises(DeployError, match="read_size"):
        check_smt_export(torch.jit.script(torch.nn.Linear(2, 2)))


def test_model_from_a_package_models_folder(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    """A MONAI Application Package holds the model as ``models/<name>/model.ts``."""
    _, model = cohort
    (tmp_path / "models" / "smt").mkdir(parents=True)
    (tmp_path / "models" / "smt" / "model.ts").write_bytes(model.read_bytes())
    found = torchscript_model(SDK_CORE.AppContext({"model": str(tmp_path / "models")}))
    assert Path(found.path) == tmp_path / "models" / "smt" / "model.ts"


def test_options_from_env() -> None:
    defaults = {"num_focus": None, "aggregation": None, "threshold": None, "default_mpp": None}
    assert options_from_env({}) == {**defaults, "backend": "auto", "num_workers": 2}  # None: the model's
    options = options_from_env({"SMT_NUM_FOCUS": "2", "SMT_BACKEND": "tifffile", "SMT_DEFAULT_MPP": "0.5"})
    assert (options["num_focus"], options["default_mpp"]) == (2, 0.5)
    bad = (
        {"SMT_NUM_FOCUS": "0"},
        {"SMT_AGGREGATION": "median"},
        {"SMT_BACKEND": "pil"},
        {"SMT_THRESHOLD": "x"},
    )
    for env in bad:
        with pytest.raises(DeployError, match=next(iter(env))):
            options_from_env(env)


def test_single_slide_input(cohort: tuple[Path, Path]) -> None:
    slides, _ = cohort
    assert slide_entries(slides / "slide_1.tif") == [{"image": str(slides / "slide_1.tif")}]
    assert len(slide_entries(slides)) == 2
