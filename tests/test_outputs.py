"""Archives: nothing lost, nothing trusted that should not be. Output names that stay inside OUT, reuse only
of the same file by the same model with the same options, half-written results redone, two runs sharing one
OUT, shards merged in input order, a per-slide time limit, and broken files among good ones."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, write_cohort

from smt_monai.inference import ModelCard, SlideListPredictor, load_model, save_model
from smt_monai.inference.outputs import MAX_NAME, OutputError, merge, parse_shard, safe_names
from smt_monai.networks import SMT

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"read_s", "compute_s", "total_s"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A tiny model file and a list of 4 good slides with a broken one and a crafted one among them."""
    root = tmp_path_factory.mktemp("archive")
    write_cohort(root / "data", count=4, splits=(0, 0, 4))
    torch.manual_seed(0)
    network = SMT(preset="tiny", grid=TINY_OVERRIDES["grid"], patch_size=TINY_OVERRIDES["patch_size"])
    save_model(network, ModelCard.for_training(network, "tiny", ["benign", "tumour"], 2), root / "model.pt")
    (root / "data" / "broken.svs").write_text("not a slide\n")
    crafted = root / "data" / "crafted.tif"  # header: one 10^6 x 10^6 px tile in a few bytes
    crafted.write_bytes(_huge_tile_tiff())
    names = ["slide_0.tif", "broken.svs", "slide_1.tif", "crafted.tif", "slide_2.tif", "slide_3.tif"]
    return root / "model.pt", [{"image": str(root / "data" / n)} for n in names]


def _huge_tile_tiff() -> bytes:
    """A little-endian TIFF whose one uncompressed 10^6 x 10^6 RGB tile is 0 bytes long."""
    import struct

    tags = [
        (256, 4, 1, 10**6), (257, 4, 1, 10**6), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
        (277, 3, 1, 3), (322, 4, 1, 10**6), (323, 4, 1, 10**6), (324, 4, 1, 8), (325, 4, 1, 0),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd


def predict(model: Path, slides: list[dict], out: Path, **options) -> dict:
    predictor = SlideListPredictor(load_model(model), slides, out, progress=False, gallery_top=0, **options)
    return predictor.run()


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def test_output_names_stay_inside_out() -> None:
    names = safe_names(
        ["a/...", "b/..tiff", "c/dup.tiff", "d/dup.tiff", "e/DUP.svs", "f/a b?c.svs", "g/.hidden"]
    )
    assert names == ["slide", "slide_2", "dup", "dup_2", "DUP_3", "a_b_c", "slide_3"]
    assert all("/" not in n and n not in (".", "..") and not n.startswith(".") for n in names)
    assert safe_names(["sub/ünï code slide.svs", "Müller_Ø1.ndpi", "切片1.svs"]) == [
        "uni_code_slide",  # accents dropped, not each letter replaced
        "Muller__1",
        "__1",
    ]
    long = safe_names(["x" * 300 + ".svs", "x" * 400 + ".svs"])
    assert long == ["x" * MAX_NAME, "x" * MAX_NAME + "_2"]
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(OutputError, match="shard"):
            parse_shard(bad)


def test_broken_and_crafted_files_are_error_rows(archive: tuple[Path, list[dict]], tmp_path: Path) -> None:
    model, slides = archive
    summary = predict(model, slides, tmp_path / "out")
    table = rows(tmp_path / "out")
    assert [Path(r["image"]).name for r in table] == [Path(s["image"]).name for s in slides]
    status = {Path(r["image"]).name: r for r in table}
    assert status["crafted.tif"]["status"] == "error" and "budget" in status["crafted.tif"]["error"]
    assert status["broken.svs"]["status"] == "error"
    assert (summary["ok"], summary["error"]) == (4, 2)

    odd = [{"image": str(tmp_path / name)} for name in ("...", "..tiff")]
    for entry in odd:
        shutil.copy(slides[0]["image"], entry["image"])
    predict(model, odd, tmp_path / "odd")
    made = sorted(p.name for p in (tmp_path / "odd").iterdir() if p.is_dir() and p.name != ".locks")
    assert made == ["slide", "slide_2"]
    assert not (tmp_path / "predictions.csv").exists()  # nothing written beside OUT


def test_reuse_only_the_same_file_model_and_options(archive: tuple[Path, list[dict]], tmp_path: Path) -> None:
    model, slides = archive
    good = [s for s in slides if "slide_" in s["image"]]
    out = tmp_path / "out"
    first = tmp_path / "a" / "dup.tif"
    second = tmp_path / "b" / "dup.tif"
    for path, source in ((first, good[0]), (second, good[1])):
        path.parent.mkdir()
        shutil.copy(source["image"], path)
    predict(model, [{"image": str(first)}, *good[2:]], out)
    done = json.loads((out / "dup" / "result.json").read_text())
    assert done["row"]["image"] == str(first)

    summary = predict(model, [{"image": str(second)}], out)  # same name, another file: predicted again
    assert summary["resumed"] == 0 and rows(out)[0]["image"] == str(second)
    record = json.loads((out / "dup" / "result.json").read_text())
    assert (
        record["slide"]["path"] == str(second) and record["row"]["prob_tumour"] != done["row"]["prob_tumour"]
    )

    reversed_list = [*good[2:][::-1], {"image": str(second)}]
    summary = predict(model, reversed_list, out)
    assert summary["resumed"] == 3 and [r["image"] for r in rows(out)] == [s["image"] for s in reversed_list]

    other = tmp_path / "other.pt"  # another model: nothing reused
    torch.manual_seed(1)
    network = SMT(preset="tiny", grid=TINY_OVERRIDES["grid"], patch_size=TINY_OVERRIDES["patch_size"])
    save_model(network, ModelCard.for_training(network, "tiny", ["benign", "tumour"], 2), other)
    assert predict(other, reversed_list, out)["resumed"] == 0
    assert predict(other, reversed_list, out, num_focus=3)["resumed"] == 0  # other options: nothing reused
    assert predict(other, reversed_list, out, num_focus=3)["resumed"] == 3


def test_half_written_results_are_redone_and_temporaries_cleaned(
    archive: tuple[Path, list[dict]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, slides = archive
    good = [s for s in slides if "slide_" in s["image"]]
    out = tmp_path / "out"
    predict(model, good, out)
    (out / "slide_1" / "result.json").write_text("")  # a run killed while writing it
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = out / "slide_2" / f".overlay.png.tmp{dead.stdout.strip()}"
    stale.write_bytes(b"half a png")
    with caplog.at_level("WARNING"):
        summary = predict(model, good, out)
    assert summary["resumed"] == 3 and summary["ok"] == 4
    assert f"{out / 'slide_1' / 'result.json'}: unreadable" in caplog.text
    assert json.loads((out / "slide_1" / "result.json").read_text())["row"]["status"] == "ok"
    assert not stale.exists()


def _run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "smt_monai.cli", "predict", *args, "--quiet", "--gallery", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _results_by(out: Path) -> dict[str, str]:
    """Each finished slide's folder name -> the ``host:pid`` that wrote its ``result.json``."""
    found = {}
    for path in out.glob("*/result.json"):
        try:
            found[path.parent.name] = json.loads(path.read_text())["by"]
        except (OSError, ValueError, KeyError):
            continue  # being replaced at this moment
    return found


@pytest.mark.slow
def test_two_runs_on_one_out_share_the_slides(archive: tuple[Path, list[dict]], tmp_path: Path) -> None:
    """A second run started on the OUT of a run under way claims the slides the first does not hold; both end
    with every slide of the list. The first run is paused (SIGSTOP) from its first result until the second
    has written one, so that the overlap does not depend on how fast the machine is."""
    model, slides = archive
    copies = []
    for index in range(12):
        copy = tmp_path / "data" / f"copy_{index:02d}.tif"
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(slides[index % 2 * 2]["image"], copy)
        copies.append(str(copy))
    listing = tmp_path / "slides.txt"
    listing.write_text("\n".join([*(s["image"] for s in slides), *copies]) + "\n")
    out = tmp_path / "out"
    first = _run_cli(str(listing), "-m", str(model), "-o", str(out))
    deadline = time.time() + 300
    while not _results_by(out) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _run_cli(str(listing), "-m", str(model), "-o", str(out))
        by_first = set(_results_by(out).values())
        while (
            not set(_results_by(out).values()) - by_first and second.poll() is None and time.time() < deadline
        ):
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    results = [run.communicate(timeout=600) for run in (first, second)]
    assert first.returncode == second.returncode == 0, results
    ok = len(slides) + len(copies) - 2  # the list's two broken files are error rows
    assert all(f"{ok} slides ok, 2 errors" in stdout for stdout, _ in results), results
    table = rows(out)
    assert [r["image"] for r in table] == [*(s["image"] for s in slides), *copies]
    writers = _results_by(out)
    assert len(writers) == len(slides) + len(copies)
    assert set(writers.values()) == {f"{socket.gethostname()}:{run.pid}" for run in (first, second)}, writers


@pytest.mark.slow
def test_ctrl_c_stops_in_one_line_and_the_same_command_goes_on(
    archive: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    """Ctrl-C during a run: exit 130 with one line saying what is kept, no traceback; the same command then
    predicts only what was not finished."""
    model, slides = archive
    copies = [str(shutil.copy(slides[0]["image"], tmp_path / f"copy_{i:02d}.tif")) for i in range(6)]
    listing = tmp_path / "slides.txt"
    listing.write_text("\n".join([*(s["image"] for s in slides), *copies]) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "smt_monai.cli", "predict", str(listing), "-m", str(model),
               "-o", str(out), "--quiet", "--gallery", "0"]  # fmt: skip
    # Python turns SIGINT into KeyboardInterrupt only where it was not ignored when it started (a shell's
    # background jobs ignore it)
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 300
    while not _results_by(out) and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: the slides finished so far are kept")
    assert "Traceback" not in stderr
    results = [json.loads(path.read_text())["row"] for path in out.glob("*/result.json")]
    done = sum(row["status"] == "ok" for row in results)  # error rows are tried again
    assert 0 < done and len(results) < len(slides) + len(copies)
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and f"{len(slides) + len(copies) - 2} slides ok, 2 errors" in again.stdout
    assert json.loads((out / "summary.json").read_text())["resumed"] == done


@pytest.mark.slow
def test_shards_and_torchrun_give_what_one_process_gives(
    archive: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    model, slides = archive
    listing = tmp_path / "slides.txt"
    listing.write_text("\n".join(s["image"] for s in slides) + "\n")
    single = tmp_path / "single"
    assert _run_cli(str(listing), "-m", str(model), "-o", str(single)).wait(600) == 0

    sharded = tmp_path / "sharded"
    shards = [
        _run_cli(str(listing), "-m", str(model), "-o", str(sharded), "--shard", f"{i}/2") for i in (0, 1)
    ]
    assert all(shard.wait(600) == 0 for shard in shards)
    assert not (sharded / "predictions.csv").exists()
    merge_command = [sys.executable, "-m", "smt_monai.cli", "merge", str(sharded)]
    merged = subprocess.run(merge_command, capture_output=True, text=True, cwd=ROOT)
    assert merged.returncode == 0 and "4 slides ok, 2 errors" in merged.stdout, merged.stderr
    assert rows(sharded) == rows(single)

    distributed = tmp_path / "torchrun"
    configs = json.dumps(
        [str(ROOT / "bundle/configs/inference.yaml"), str(ROOT / "bundle/configs/multi_gpu_inference.yaml")]
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29517", "-m", "monai.bundle", "run", "inference", "--config_file", configs,
               "--datalist", str(listing), "--ckpt_path", str(model), "--output_dir", str(distributed),
               "--gallery_top", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(distributed) == rows(single)
    predicted_by = {
        json.loads((distributed / Path(s["image"]).stem / "result.json").read_text())["by"] for s in slides
    }
    assert len(predicted_by) == 2, "each process predicted its share"


def test_a_slide_over_its_time_limit_is_an_error_row(
    archive: tuple[Path, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smt_monai.inference.api import SMTPredictor

    model, slides = archive
    good = [s for s in slides if "slide_" in s["image"]]
    view = SMTPredictor.view

    def hanging(self, path):  # a reader stuck on one file (a stalled network mount)
        if path.endswith("slide_1.tif"):
            time.sleep(60)
        return view(self, path)

    monkeypatch.setattr(SMTPredictor, "view", hanging)
    start = time.perf_counter()
    summary = predict(model, good, tmp_path / "out", slide_timeout=5.0, slides_in_flight=2)
    assert time.perf_counter() - start < 50
    status = {Path(r["image"]).name: r for r in rows(tmp_path / "out")}
    assert status["slide_1.tif"]["status"] == "error" and "slide_timeout" in status["slide_1.tif"]["error"]
    assert summary["ok"] == 3


def test_an_unwritable_out_and_an_empty_merge_are_one_line(
    archive: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    model, slides = archive
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a folder")
    with pytest.raises(OutputError, match="cannot write the output folder"):
        predict(model, slides[:1], blocked / "out")
    with pytest.raises(OutputError, match="no slides.json"):
        merge(tmp_path)
    command = [sys.executable, "-m", "smt_monai.cli", "merge", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert os.path.exists(model)
