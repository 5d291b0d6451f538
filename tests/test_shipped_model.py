"""The model the bundle ships (``bundle/models/model.pt``): it describes itself, passes the model zoo's checks
as the zoo's ``ci/verify_bundle.py`` runs them, and tells tumour from benign mimics on slides it never saw."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smt_monai.inference import CARD_KEY, ModelCard, SMTPredictor, load_model

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
MODEL = BUNDLE / "models" / "model.pt"


def test_the_shipped_model_loads_safely_and_describes_itself() -> None:
    content = torch.load(MODEL, map_location="cpu", weights_only=True)
    assert set(content) >= {"model", CARD_KEY}
    network = load_model(MODEL)
    card = ModelCard.of(network)
    assert card.class_names == ["negative", "tumour"]
    assert card.network["geometry"] == "physical" and card.network["layer3_mpp"] == pytest.approx(0.75)
    assert card.num_focus == 4 and card.aggregation == "max"
    assert 0.0 < card.threshold < 1.0
    assert card.validation["metrics"]["balanced_accuracy"] >= 0.8
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {str(i): name for i, name in enumerate(card.class_names)}
    side = metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert side == [network.read_size, network.read_size]


def test_the_bundle_passes_the_model_zoo_checks(tmp_path: Path) -> None:
    """What the zoo's ``verify_bundle.py`` runs in its full mode, offline: necessary files, version and
    changelog, metadata against the schema, the network's input/output shapes from ``network_data_format``,
    and the TorchScript export of ``models/model.pt`` as it is (no ``key_in_ckpt``), loaded back."""
    from monai.bundle import ckpt_export, verify_net_in_out

    bundle = tmp_path / "smt_wsi_classification"
    shutil.copytree(BUNDLE, bundle)
    necessary = ["configs/metadata.json", "configs/inference.yaml", "LICENSE", "models/model.pt"]
    necessary.append("docs/README.md")
    for name in necessary:
        assert (bundle / name).is_file(), name
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    from smt_monai import __version__

    assert metadata["required_packages_version"]["smt-monai"] == __version__
    meta, config = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.yaml")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(bundle))
    exported = bundle / "models" / "verify_model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=meta,
        config_file=config,
        bundle_root=str(bundle),
    )
    script = torch.jit.load(str(exported))
    eager = load_model(MODEL)
    side = eager.read_size
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(script(x, 3), eager(x, 3))


@pytest.mark.slow
def test_the_shipped_model_classifies_fresh_synthetic_slides(tmp_path: Path) -> None:
    """Six slides of a cohort seed the model never saw (40x, 2-4 mm of tissue, tumour and benign mimics):
    the shipped model gets at least five right and ranks the positives above the negatives on average."""
    result = subprocess.run(
        [sys.executable, "-m", "smt_monai.cli", "synth", "--out", str(tmp_path), "--num-slides", "6"]
        + ["--seed", "7", "--mpp", "0.25", "--tissue-mm", "2,4", "--split", "0", "0", "1", "--workers", "1"]
        + ["--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    slides = json.loads((tmp_path / "datalist.json").read_text())["testing"]
    predictor = SMTPredictor.from_checkpoint(MODEL)
    labels, predicted, positive = [], [], []
    for slide in slides:
        prediction = predictor.predict(tmp_path / slide["image"])
        assert prediction.ok, prediction.error
        labels.append(slide["label"])
        predicted.append(prediction.class_names.index(prediction.label))
        positive.append(float(prediction.probs[1]))
    assert sorted(set(labels)) == [0, 1]
    assert sum(p == y for p, y in zip(predicted, labels)) >= 5, (labels, positive)
    mean = {y: sum(p for p, t in zip(positive, labels) if t == y) / labels.count(y) for y in (0, 1)}
    assert mean[1] > mean[0], (labels, positive)


def test_a_model_file_names_its_heads_and_the_cli_stops_quietly_on_a_closed_pipe(tmp_path: Path) -> None:
    """``smt-monai model``: a model with a slide or risk head says so; piped into ``head``, no traceback."""
    from smt_monai.networks import smt_tiny

    card = ModelCard.for_training(smt_tiny(num_classes=3, risk_head=True), "tiny")
    assert "slide-level heads: risk head" in card.describe()
    assert "heads" not in ModelCard.of(load_model(MODEL)).describe()
    shell = f"{sys.executable} -m smt_monai model {MODEL} | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("SMT, preset") and "Traceback" not in done.stderr


class _Payload:
    """Unpickling this would call ``os.system``: what a crafted model file does."""

    def __reduce__(self) -> tuple:
        import os

        return (os.system, ("true",))


def _unusable_model_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """File -> what its one line must say: files a user may pass as ``--model`` by mistake or damaged."""
    truncated = folder / "copied" / "model.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(MODEL.read_bytes()[:100_000])
    crafted = folder / "crafted.pt"
    torch.save({"model": {}, "payload": _Payload()}, crafted)
    run = folder / "run"
    run.mkdir()
    shutil.copy(MODEL, run / "model.pt")
    torch.save({"network": {}, "optimizer": {}, "trainer": {"epoch": 3}}, run / "checkpoint_epoch=3.pt")
    (folder / "card.json").write_text('{"preset": "tiny"}')
    (folder / "random.pt").write_bytes(bytes(range(7, 250)))
    content = torch.load(MODEL, weights_only=True)
    content[CARD_KEY]["network"]["future_knob"] = 3  # a setting a newer smt-monai added
    torch.save(content, folder / "newer.pt")
    content[CARD_KEY]["network"].pop("future_knob")
    content[CARD_KEY]["network"]["grid"] = "four"  # an edited card
    torch.save(content, folder / "edited.pt")
    return {
        "truncated": (truncated, "truncated or corrupt: a zip archive without the directory at its end"),
        "crafted": (crafted, "refused: it holds Python objects other than tensors and plain data"),
        "checkpoint": (run / "checkpoint_epoch=3.pt", f"is a training checkpoint .* use {run / 'model.pt'}$"),
        "json": (folder / "card.json", r"""not a file torch.save writes \(it starts with b'{"pr'\)"""),
        "random": (folder / "random.pt", r"not a file torch.save writes \(it starts with b'\\x07\\x08"),
        "newer": (folder / "newer.pt", r"network has settings \['future_knob'\] this smt-monai lacks"),
        "edited": (folder / "edited.pt", r"the model card's network settings build no network \(unsupported"),
    }


def test_unusable_model_files_are_named_in_one_line_that_never_advises_unsafe_loading(tmp_path: Path) -> None:
    """torch's own refusal suggests ``weights_only=False`` (which would run the crafted file's code); the line
    says instead what the file is: a cut copy, a pickle with code, a training checkpoint, another format."""
    from smt_monai.inference.model import ModelFileError

    cases = _unusable_model_files(tmp_path)
    for path, pattern in cases.values():
        with pytest.raises(ModelFileError, match=pattern) as info:
            load_model(path)
        assert str(info.value).startswith(f"{path}: ") and "weights_only" not in str(info.value)
    done = subprocess.run(
        [sys.executable, "-m", "smt_monai", "model", str(cases["crafted"][0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {cases['crafted'][0]}: refused") and done.stderr.count("\n") == 1
    assert "GLOBAL posix.system" in done.stderr or "GLOBAL os.system" in done.stderr
