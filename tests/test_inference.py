"""Bundle inference on a slide list with broken files: every output, atomic writes, resume, exit codes; and
the inference cascade's choice of what to focus by."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, scene, write_cohort, write_tiff

from smt_monai.cascade import predict_slide
from smt_monai.data import open_slide
from smt_monai.data.geometry import child_boxes
from smt_monai.focus import class_attention, focusing_score
from smt_monai.inference import ModelCard, save_model
from smt_monai.networks import SMT, normalize_he, smt_tiny

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = ROOT / "bundle" / "configs" / "inference.yaml"


@pytest.fixture(scope="module")
def model_and_list(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """A random tiny SMT checkpoint and a slide list mixing good slides with every kind of broken file."""
    folder = tmp_path_factory.mktemp("inference")
    datalist = write_cohort(folder / "data", count=4, splits=(0, 0, 4))
    torch.manual_seed(0)
    model = SMT(preset="tiny", grid=TINY_OVERRIDES["grid"], patch_size=TINY_OVERRIDES["patch_size"])
    save_model(model, ModelCard.for_training(model, "tiny", ["benign", "tumour"]), folder / "model.pt")
    data = datalist.parent
    (data / "empty.svs").write_bytes(b"")
    (data / "notes.svs").write_text("this is not a slide\n")
    truncated = (data / "slide_0.tif").read_bytes()
    (data / "truncated.tif").write_bytes(truncated[: len(truncated) // 3])
    names = [
        "slide_0.tif",
        "missing.svs",
        "slide_1.tif",
        "empty.svs",
        "truncated.tif",
        "notes.svs",
        "slide_2.tif",
    ]
    listing = folder / "slides.txt"
    listing.write_text("\n".join(f"data/{n}" for n in names) + "\n")
    return folder / "model.pt", listing, [data / n for n in names]


def run_inference(listing: Path, model: Path, out: Path, **extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(INFERENCE),
            "--datalist", str(listing), "--ckpt_path", str(model), "--output_dir", str(out)]  # fmt: skip
    for key, value in {**TINY_OVERRIDES, **extra}.items():
        if key != "batch_size":
            args += [f"--{key}", str(value)]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_slide_list_with_broken_files(model_and_list: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    model, listing, slides = model_and_list
    out = tmp_path / "out"
    result = run_inference(listing, model, out)
    assert result.returncode == 0, result.stderr[-3000:]

    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == [str(p) for p in slides]  # one row per slide, input order
    status = {Path(r["image"]).name: r for r in rows}
    with open_slide(slides[0]) as slide:
        width_mm, height_mm = (side * slide.mpp / 1000 for side in slide.dimensions)
    for good in ("slide_0.tif", "slide_1.tif", "slide_2.tif"):
        row = status[good]
        assert row["status"] == "ok" and row["error"] == "" and row["backend"]
        assert abs(float(row["prob_benign"]) + float(row["prob_tumour"]) - 1) < 1e-4
        assert row["class"] in ("benign", "tumour") and float(row["scan_mpp"]) == 0.5
        assert float(row["read_mpp"]) == pytest.approx(1.0, rel=0.1)  # the tiny preset's layer3_mpp
        assert 0 < float(row["tissue_mm2"]) < width_mm * height_mm
        assert float(row["total_s"]) >= float(row["compute_s"]) > 0 and float(row["read_s"]) > 0
    reasons = {"missing.svs": "does not exist", "empty.svs": "empty", "truncated.tif": "truncated",
               "notes.svs": "not a slide"}  # fmt: skip
    for name, reason in reasons.items():
        row = status[name]
        assert row["status"] == "error" and reason in row["error"] and name in row["error"], row
        assert "\n" not in row["error"] and row["prediction"] == ""
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["slides"], summary["ok"], summary["error"]) == (7, 3, 4)
    assert summary["mean_seconds_per_slide"] > 0

    for good in ("slide_0", "slide_1", "slide_2"):
        folder = out / good
        with open_slide(slides[[p.stem for p in slides].index(good)]) as slide:
            width, height = slide.dimensions
            mpp = slide.mpp
        check_geojson(json.loads((folder / "focus.geojson").read_text()), width, height, k=2)
        assert (folder / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (folder / "gallery.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG: photographs of tissue
        focus_map = nib.load(folder / "focus_map.nii.gz")
        assert focus_map.shape[:2] == (TINY_OVERRIDES["grid"],) * 2
        assert 0 <= float(focus_map.get_fdata().min()) and float(focus_map.get_fdata().max()) <= 1
        ring = np.array(
            json.loads((folder / "focus.geojson").read_text())["features"][0]["geometry"]["coordinates"][0]
        )
        clipped_side = (ring.max(axis=0) - ring.min(axis=0)).max()
        step = focus_map.affine[0, 0]  # one patch of the layer-1 square, in mm
        assert mpp and focus_map.header.get_xyzt_units()[0] == "mm"
        assert step == pytest.approx(focus_map.affine[1, 1])
        assert step * TINY_OVERRIDES["grid"] == pytest.approx(clipped_side * mpp / 1000, rel=0.35)
    assert not list(out.rglob(".*tmp*")), "no temporary files are left behind"

    # a rerun with the same OUT skips the finished slides and rewrites the tables
    rerun = run_inference(listing, model, out)
    assert rerun.returncode == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] == 3


def check_geojson(collection: dict, width: int, height: int, k: int) -> None:
    """Boxes of all three layers lie inside the slide and nest: layer 3 in layer 2 in layer 1."""
    assert collection["type"] == "FeatureCollection"
    by_layer: dict[int, list] = {1: [], 2: [], 3: []}
    for feature in collection["features"]:
        props = feature["properties"]
        ring = np.array(feature["geometry"]["coordinates"][0])
        x0, y0 = ring.min(axis=0)
        x1, y1 = ring.max(axis=0)
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert {"layer", "rank", "focus", "probability"} <= set(props)
        assert props["classification"]["name"].startswith("SMT layer")
        by_layer[props["layer"]].append(((x0, y0, x1, y1), props))
    assert [len(by_layer[layer]) for layer in (1, 2, 3)] == [1, k, k * k]
    for layer in (2, 3):
        for box, props in by_layer[layer]:
            parent = by_layer[layer - 1][props["parent"]][0]
            assert parent[0] <= box[0] and parent[1] <= box[1] and box[2] <= parent[2] and box[3] <= parent[3]
            assert 0 <= props["focus"] <= 1 and 0 <= props["probability"] <= 1
        assert sorted(p["rank"] for _, p in by_layer[layer]) == sorted(
            list(range(k)) * (len(by_layer[layer]) // k)
        )


def test_all_broken_exits_1_with_the_reason(
    model_and_list: tuple[Path, Path, list[Path]], tmp_path: Path
) -> None:
    model, _, slides = model_and_list
    listing = tmp_path / "broken.csv"
    listing.write_text("image\n" + "\n".join(str(p) for p in slides if "slide_" not in p.name) + "\n")
    result = run_inference(listing, model, tmp_path / "out")
    assert result.returncode == 1
    assert "no slide succeeded" in result.stdout + result.stderr
    assert (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--k", "0"], "argument --k: must be 1 or more, got 0"),
        (["--k", "17"], "K (num_focus) 17: this model's regions hold 16 patches (4 x 4), so K is 1 to 16"),
        (["--default-mpp", "-0.5"], "argument --default-mpp/--default_mpp: must be a number above 0"),
        (["--default-mpp", "50"], "default_mpp 50: not a scan's level-0 um/px"),
        (["--slide-timeout", "0"], "argument --slide-timeout: must be a number above 0"),
        (["--workers", "0"], "argument --workers: must be 1 or more"),
        (["--slides-in-flight", "0"], "argument --slides-in-flight: must be 1 or more"),
        (["--gallery", "-1"], "argument --gallery: must be 0 or more"),
        (["--device", "tpu"], "device 'tpu': "),
        (["--device", "cuda:99"], "device 'cuda:99': "),
    ],
)
def test_predict_refuses_an_unusable_option_in_one_line(
    model_and_list: tuple[Path, Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture, option, says
) -> None:
    """An option no run could use stops the command before any slide is read: exit 2, one line naming the
    option and the range it takes, no traceback (before, ``--k 0`` silently meant the model's K, ``--k 17``
    ended in a traceback, and ``--device cuda`` on a machine without one called the model file corrupt)."""
    from smt_monai.cli import main

    model, _, slides = model_and_list
    out = tmp_path / "out"
    try:
        status = main(["predict", str(slides[0]), "-m", str(model), "-o", str(out), "--quiet", *option])
    except SystemExit as exc:  # argparse's own refusal
        status = exc.code
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert says in errors[-1] and "Traceback" not in "\n".join(errors)
    assert not (out / "predictions.csv").exists()


def test_a_blank_slide_is_read_whole_with_a_warning_and_no_tissue(
    model_and_list: tuple[Path, Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A blank or failed scan is not silently a benign slide: its row says 0 mm^2 of tissue, and the log
    names the file."""
    from smt_monai.inference import SMTPredictor

    model, _, _ = model_and_list
    blank = write_tiff(tmp_path / "blank.tif", np.full((768, 1024, 3), 243, np.uint8))
    with caplog.at_level("WARNING"):
        result = SMTPredictor.from_checkpoint(model).predict(blank)
    assert result.ok and result.tissue_mm2 == 0.0
    assert f"{blank}: no tissue found" in caplog.text


class RandomRegions:
    """Stands in for the region reads of one slide: random uint8 images, counting the rows asked for."""

    def __init__(self, side: int) -> None:
        self.side = side
        self.reads: list[int] = []

    def chunks(self, paths: list[str], slide_index: np.ndarray, boxes: np.ndarray):
        self.reads.append(len(boxes))
        yield (
            np.arange(len(boxes)),
            torch.randint(0, 256, (len(boxes), 3, self.side, self.side), dtype=torch.uint8),
        )


@pytest.mark.parametrize("source", ["q", "score", "attention"])
def test_predict_slide_focuses_by_the_chosen_source(source: str) -> None:
    """Top-K at inference by q, by the instantaneous Eq. 2 score, or by class attention (the ablations);
    1 + K + K^2 regions either way, and layer 2's boxes are the chosen patches of layer 1."""
    torch.manual_seed(0)
    model = smt_tiny().eval()
    side, k = model.read_size, 2
    image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8)
    box = np.array([0.0, 0.0, 6400.0])
    view = {"path": "slide.tif", "image": image, "box": box}
    reader = RandomRegions(side)

    prediction = predict_slide(model, view, reader, num_focus=k, focus_source=source)
    assert reader.reads == [k, k * k]
    out = model.layer1(normalize_he(image[None]))
    ranking = {
        "q": out.q,
        "score": focusing_score(out.probs, out.attn),
        "attention": class_attention(out.attn),
    }[source]
    chosen = torch.topk(ranking.detach(), k).indices
    np.testing.assert_allclose(
        prediction.boxes[1], child_boxes(torch.as_tensor(box[None]), chosen, 4)[0].numpy()
    )
    np.testing.assert_allclose(
        prediction.focus_map.ravel(), ranking.detach()[0].numpy(), rtol=1e-4, atol=1e-6
    )
    assert [len(b) for b in prediction.boxes] == [1, k, k * k]
    assert prediction.parent[2].tolist() == [0, 0, 1, 1] and prediction.rank[2].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="focus_source"):
        predict_slide(model, view, reader, num_focus=k, focus_source="saliency")


def test_learned_aggregation_is_the_slide_head_on_the_layer3_embeddings(tmp_path: Path) -> None:
    """``aggregation: learned``: the slide probabilities are the slide head's softmax over the K^2 layer-3
    class-token embeddings, also from the TorchScript export; a model without a head refuses it."""
    from smt_monai.cascade.prediction import aggregate, check_aggregation

    torch.manual_seed(0)
    model = smt_tiny(num_classes=4, slide_head=True).eval()
    side, k = model.read_size, 2
    view = {"path": "slide.tif", "image": torch.randint(0, 256, (3, side, side), dtype=torch.uint8)}
    view["box"] = np.array([0.0, 0.0, 6400.0])
    reader = RandomRegions(side)
    images: list[torch.Tensor] = []
    chunks = reader.chunks
    reader.chunks = lambda *args: ((i, images.append(x) or x) for i, x in chunks(*args))
    learned = predict_slide(model, view, reader, num_focus=k, aggregation="learned")
    with torch.no_grad():
        logits, attention = model.slide_head(model.layer3(normalize_he(images[-1])).cls_embedding)
    assert logits.shape == (1, 4) and attention.shape == (k * k,)
    np.testing.assert_allclose(learned.probs, torch.softmax(logits, -1)[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(learned.layer_probs[1], aggregate(learned.region_probs[1], "max"), atol=1e-6)
    scripted = torch.jit.script(model)
    scripted.save(str(tmp_path / "model.ts"))
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    embeddings = torch.randn(5, model.config.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(exported.slide_head(embeddings)[0], model.slide_head(embeddings)[0])
    with pytest.raises(ValueError, match="slide head"):
        check_aggregation(smt_tiny(), "learned")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        check_aggregation(model, "median")


def test_max_aggregation_grades_a_slide_by_its_furthest_region() -> None:
    """``max``: P(slide >= c) is the largest P(region >= c); a single high-grade region grades the slide,
    where ``mean`` dilutes it; for two classes it is the region with the largest P(positive)."""
    from smt_monai.cascade.prediction import aggregate

    regions = np.array([[0.9, 0.1, 0.0, 0.0]] * 15 + [[0.1, 0.1, 0.1, 0.7]])
    slide = aggregate(regions, "max")
    np.testing.assert_allclose(slide, [0.1, 0.1, 0.1, 0.7], atol=1e-9)
    assert int(aggregate(regions, "mean").argmax()) == 0
    mixed = np.array([[0.2, 0.5, 0.3], [0.3, 0.1, 0.6]])  # P(>=1): 0.8 vs 0.7; P(>=2): 0.3 vs 0.6
    np.testing.assert_allclose(aggregate(mixed, "max"), [0.2, 0.2, 0.6], atol=1e-9)
    binary = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_allclose(aggregate(binary, "max"), binary[1], atol=1e-12)


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    """The README's Python example, as written, on a slide of ours with the model the bundle ships."""
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip() and "import" not in line]) == 3
    slide = write_tiff(tmp_path / "slide.svs.tif", scene(768, 1024), mpp=0.5)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code.replace('"slide.svs"', repr(str(slide))), "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    result = namespace["result"]
    assert result.ok and result.label in result.class_names and abs(result.probs.sum() - 1) < 1e-4
    regions = result.regions()
    assert regions[0]["layer"] == 1 and {"x_um", "size_um", "q", "p_positive"} <= set(regions[-1])
