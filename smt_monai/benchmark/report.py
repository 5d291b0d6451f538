"""``docs/benchmarks.md`` from the JSON figures of ``speed``, ``accuracy`` and ``ablation``, with its plots.

Everything in the page comes from the JSON files (figures, machine, versions, commands), so rerunning the
benchmarks and then ``report`` regenerates it; a benchmark that was not run is said to be missing rather
than left out silently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGETS = {"dense_over_smt_k4": 300.0, "dense_over_smt_stretch_k4": 500.0, "smt_over_floor_k4": 2.0}
GPU_TARGET_SECONDS_K8 = 2.0
GPU_TARGET_SIDE = 100000
"""On a GPU: under 2 s per 100000 x 100000 px slide at K = 8, end to end (the paper: 2.17 to 5.65 s, A800)."""
FOCUS_NOTE = (
    "Focus measures on the positive annotated slides: hit rate (some layer-3 region on tumour), top-1 (the "
    "most probable one is), region precision (the share of the K^2 that are); in brackets their chance "
    "level, every layer picking K tissue patches at random on the same slides (exact)."
)
LANDING_ORDER = ("tumour", "mimic", "normal", "glass")
ACCURACY_GAP_POINTS = 2.0
MIN_TEST_SLIDES = 20
"""Below this many test slides one slide moves balanced accuracy by more than the 2-point target."""


def _load(path: str | os.PathLike | None) -> dict[str, Any] | None:
    if path is None or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text())


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_chance(values: dict[str, Any], name: str) -> str:
    """``value (chance)`` of a focus measure ``name`` in ``values`` (figures or their summaries)."""

    def one(key: str) -> str:
        value = values.get(key)
        if isinstance(value, dict):
            value = value.get("mean")
        return _f(value)

    return f"{one(name)} ({one(name + '_chance')})"


def _cohort(data: dict[str, Any]) -> str:
    """The benchmark cohort and how it was drawn."""
    if data.get("slide_size") is None:  # a cohort of one's own (--dataset-dir)
        return f"`{data['cohort']}` ({data['num_slides']} slides)"
    contrast = data.get("low_mag_tumour_contrast") or 0
    drawn = f", `--low-mag-tumour-contrast {contrast:g}`" if contrast else ""
    return f"synthetic `{data['cohort']}` ({data['num_slides']} slides of {data['slide_size']} px{drawn})"


def _extra_test_slides(data: dict[str, Any]) -> str:
    """How a benchmark's testing split was extended (``held_out_datalist``, ``own_cohort``), or nothing."""
    if data.get("test_datalists"):
        return " plus the testing splits of " + ", ".join(f"`{p}`" for p in data["test_datalists"])
    if not data.get("extra_test_slides"):
        return ""
    return (
        f" plus {data['extra_test_slides']} slides of a second cohort drawn the same way"
        f" (`{data['test_datalist']}`)"
    )


def _provenance(name: str, data: dict[str, Any]) -> list[str]:
    env = data.get("environment", {})
    lines = [
        f"- **{name}**: `{data.get('command', '?')}`"
        + (" (**quick mode**: tiny sizes, figures meaningless)" if data.get("quick") else ""),
        *(f"  - merged with the results of `{command}`" for command in data.get("merged_commands", [])),
        f"  - {env.get('cpu', '?')}, {env.get('cores', '?')} cores, {env.get('torch_threads', '?')} torch "
        f"threads, device {env.get('device', '?')}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}; "
        f"Python {env.get('python', '?')}, torch {env.get('torch', '?')}, MONAI {env.get('monai', '?')}; "
        f"load average at the end {env.get('load_average', '?')}",
    ]
    return lines


def _on_gpu(speed: dict[str, Any]) -> bool:
    return str(speed.get("environment", {}).get("device", "cpu")).startswith("cuda")


def _speed_targets(speed: dict[str, Any]) -> list[str]:
    """The targets this run is judged against: the CPU ratios at K = 4, or the GPU time at K = 8."""
    if _on_gpu(speed):
        seconds = speed.get("smt_seconds_k8")
        if seconds is None:
            return []
        if min(speed["slide_width"], speed["slide_height"]) < GPU_TARGET_SIDE:
            verdict = f"not judged, the slide is smaller than {GPU_TARGET_SIDE} px"
        else:
            verdict = "met" if seconds < GPU_TARGET_SECONDS_K8 else "**missed**"
        return [
            "",
            f"Target (GPU, K = 8, end to end): under {GPU_TARGET_SECONDS_K8:g} s per {GPU_TARGET_SIDE} x "
            f"{GPU_TARGET_SIDE} px slide: {_f(seconds)} s, {verdict}",
        ]
    ratio, floor = speed.get("dense_over_smt_k4"), speed.get("smt_over_floor_k4")
    if ratio is None or floor is None:
        return []
    ratio_met = "met" if ratio >= TARGETS["dense_over_smt_k4"] else "**missed**"
    floor_met = "met" if floor <= TARGETS["smt_over_floor_k4"] else "**missed**"
    return [
        "",
        "Targets (K = 4):",
        "",
        f"- dense / SMT >= 300 (stretch 500): {_f(ratio, 1)}, {ratio_met}",
        f"- SMT / I/O floor <= 2: {_f(floor, 2)}, {floor_met}",
    ]


def speed_section(
    speed: dict[str, Any],
    plot_dir: Path,
    doc_dir: Path,
    heading: str = "Speed",
    plot_name: str = "time_vs_size.png",
) -> list[str]:
    """Tables of per-slide time, ratios against the targets, the size sweep with memory, and its plot.

    ``heading`` and ``plot_name`` tell a second speed run (on a GPU) from the first.
    """
    focus = sorted(int(k[len("regions_k") :]) for k in speed if k.startswith("regions_k"))
    sides = f"regions read at {speed['read_size']} px"
    if speed.get("network_side", speed["read_size"]) != speed["read_size"]:
        sides += f", the patch stem's pooled side of {speed['network_side']} px layer inputs"
    lines = [
        f"## {heading}",
        "",
        f"One slide of {speed['slide_width']} x {speed['slide_height']} px"
        + (f" ({100 * speed['tissue_fraction']:.0f}% tissue)" if speed.get("tissue_fraction") else "")
        + f", backend `{speed['backend']}`, {speed['num_workers']} reading threads, "
        + ("bfloat16 autocast" if speed.get("amp") else "float32")
        + f" for both networks, SMT preset "
        f"`{speed['preset']}` ({sides}), random weights, median of "
        f"{speed['repeats']} runs after a warm-up. Every run opens the slide afresh.",
        "",
        "| method | regions / tiles | s / slide | network s | waiting for reads s | dense / this |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in focus:
        lines.append(
            f"| SMT, K = {k} | {speed[f'regions_k{k}']} | {_f(speed[f'smt_seconds_k{k}'])} | "
            f"{_f(speed[f'smt_compute_seconds_k{k}'])} | {_f(speed[f'smt_read_wait_seconds_k{k}'])} | "
            f"{_f(speed[f'dense_over_smt_k{k}'], 1)} |"
        )
    for k in focus:
        lines.append(
            f"| reading SMT's regions only (I/O floor), K = {k} | {speed[f'regions_k{k}']} | "
            f"{_f(speed[f'floor_seconds_k{k}'])} | - | - | - |"
        )
    how = (
        f"extrapolated from {speed['dense_tiles_timed']} timed tiles"
        if speed["dense_extrapolated"]
        else "all tiles timed"
    )
    lines += [
        f"| dense ResNet-18 + attention MIL ({how}) | {speed['dense_tiles_total']} | "
        f"{_f(speed['dense_seconds'], 1)} | {_f(speed['dense_compute'], 1)} (timed tiles) | "
        f"{_f(speed['dense_read_wait'], 2)} (timed tiles) | 1 |",
        "",
        f"Dense costs {_f(1000 * speed['dense_seconds_per_tile'], 2)} ms per tile.",
        "",
    ]
    for k in focus:
        lines.append(
            f"- K = {k}: dense / SMT = **{_f(speed[f'dense_over_smt_k{k}'], 1)}**, "
            f"SMT / I/O floor = **{_f(speed[f'smt_over_floor_k{k}'], 2)}**"
        )
    lines += _speed_targets(speed)
    sizes = speed.get("by_size", [])
    if sizes:
        k = focus[0]
        lines += [
            "",
            f"### Time and memory against slide size (K = {k})",
            "",
            "Dense time per size is the measured cost per tile times that slide's tissue tiles. Peak memory "
            "is the resident set of a fresh process running SMT on that one slide (model included)"
            + (", host memory only." if _on_gpu(speed) else "."),
            "",
            "| slide side px | tissue | SMT s | dense tiles | dense s (est.) | dense / SMT | model RSS MiB | "
            "peak RSS MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in sizes:
            lines.append(
                f"| {p['size']} | {_f(p.get('tissue_fraction'), 2)} | {_f(p[f'smt_seconds_k{k}'])} | "
                f"{p['dense_tiles']} | {_f(p['dense_seconds'], 1)} | "
                f"{_f(p['dense_seconds'] / p[f'smt_seconds_k{k}'], 1)} | {_f(p['model_rss_mb'], 0)} | "
                f"{_f(p['peak_rss_mb'], 0)} |"
            )
        if len(sizes) > 1:
            image = _plot_time_vs_size(sizes, k, plot_dir / plot_name)
            lines += ["", f"![time per slide against slide size]({os.path.relpath(image, doc_dir)})"]
    return lines + [""]


def throughput_section(rate: dict[str, Any]) -> list[str]:
    """Slides per hour of ``smt-monai predict`` by processes (shards on one machine) and slides in flight."""
    lines = [
        "## Throughput",
        "",
        f"`smt-monai predict` on a list of {rate['num_slides']} slides of {rate['slide_size']} px (K = "
        f"{rate['num_focus']}, {rate['preset']} preset, every output written; several processes are shards "
        f"merged at the end), on {rate['environment'].get('cores')} CPU cores:",
        "",
        "| processes | slides in flight each | seconds | slides per hour |",
        "|---:|---:|---:|---:|",
    ]
    for run in rate["runs"]:
        per_hour = f"{run['slides_per_hour']:,.0f}"
        lines.append(f"| {run['processes']} | {run['in_flight']} | {_f(run['seconds'], 1)} | {per_hour} |")
    return lines + [""]


def accuracy_section(acc: dict[str, Any]) -> list[str]:
    """SMT against dense on the held-out split."""
    prefix = "balanced_accuracy_smt_k"
    focus = sorted(int(k[len(prefix) :]) for k in acc if k.startswith(prefix))
    trained = (
        f"SMT the model `{acc['smt_model']}`, dense trained on its training split; both evaluated"
        if acc.get("smt_model")
        else "both models trained on its training split and evaluated"
    )
    lines = [
        "## Accuracy",
        "",
        f"Cohort {_cohort(acc)}; {trained} on its testing split"
        + _extra_test_slides(acc)
        + f" ({acc.get('num_test_slides', '?')} slides), which neither saw. SMT configs: "
        f"`{' + '.join(['train.yaml', *acc.get('smt_overlays', [])])}`, overrides "
        f"`{json.dumps(acc['smt_overrides'])}`; dense overrides: `{json.dumps(acc['dense_overrides'])}`. "
        + FOCUS_NOTE,
        "",
        "| model | AUC | balanced accuracy | layer-1 balanced accuracy | focus hit rate | focus top-1 | "
        "focus region precision | s / slide |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in focus:
        figures = {name.removesuffix(f"_k{k}"): v for name, v in acc.items() if name.endswith(f"_k{k}")}
        focus_cells = " | ".join(
            _with_chance(figures, name) for name in ("focus_hit_rate", "focus_top1", "focus_region_precision")
        )
        lines.append(
            f"| SMT, K = {k} | {_f(acc[f'auc_smt_k{k}'])} | {_f(acc[f'balanced_accuracy_smt_k{k}'])} | "
            f"{_f(acc.get(f'balanced_accuracy_layer1_smt_k{k}'))} | {focus_cells} | "
            f"{_f(acc.get(f'seconds_per_slide_smt_k{k}'))} |"
        )
    lines.append(
        f"| dense | {_f(acc['auc_dense'])} | {_f(acc['balanced_accuracy_dense'])} | - | - | - | - | "
        f"{_f(acc.get('seconds_per_slide_dense'))} |"
    )
    gap = acc.get("dense_minus_smt_points_k4")
    if gap is not None and (acc.get("num_test_slides") or 0) < MIN_TEST_SLIDES:
        lines += ["", f"Target (SMT within 2 points of dense): not judged, < {MIN_TEST_SLIDES} test slides."]
    elif gap is not None:
        met = "met" if gap <= ACCURACY_GAP_POINTS else "**missed**"
        auc_gap = acc.get("dense_minus_smt_auc_points_k4")
        auc = f" (AUC: {auc_gap:.1f} points)" if auc_gap is not None else ""
        lines += [
            "",
            "Target: SMT (K = 4) within 2 points of dense, balanced accuracy at each model's validated "
            f"threshold: dense - SMT = {gap:.1f} points{auc}, {met}.",
        ]
    return lines + [""] + lesion_table(acc, focus)


def lesion_table(acc: dict[str, Any], focus: list[int]) -> list[str]:
    """Recall of the tumour slides by their largest lesion's greatest dimension, SMT at each K and dense
    (nothing where the results hold none)."""
    rows = [(f"SMT, K = {k}", acc.get(f"lesion_recall_smt_k{k}") or {}) for k in focus]
    rows.append(("dense", acc.get("lesion_recall_dense") or {}))
    bins = next((list(figures) for _, figures in rows if figures), [])
    if not bins:
        return []

    def cell(figure: dict[str, Any] | None) -> str:
        if not figure or figure.get("recall") is None or not math.isfinite(figure["recall"]):
            return "-"
        found = round(figure["recall"] * figure["slides"])
        return f"{figure['recall']:.2f} ({found} of {int(figure['slides'])})"

    names = [name.removesuffix("mm").replace("_", " ") + " mm" for name in bins]
    lines = [
        "Recall of the tumour slides by their largest lesion's greatest dimension (slides found of the "
        "slides in the bin, at each model's validated threshold):",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, figures in rows:
        lines.append(f"| {label} | " + " | ".join(cell(figures.get(b)) for b in bins) + " |")
    return lines + [""]


def _settings(variant: dict[str, Any]) -> str:
    """A variant's overlays and overrides, short: an object's class for a config object."""

    def short(value: Any) -> str:
        if isinstance(value, dict) and "_target_" in value:
            return str(value["_target_"]).rsplit(".", 1)[-1]
        return json.dumps(value)

    parts = [" + ".join(variant.get("overlays", []))]
    parts += [f"{key}: {short(value)}" for key, value in variant["overrides"].items()]
    return "; ".join(p for p in parts if p) or "-"


def _landing_section(abl: dict[str, Any]) -> list[str]:
    """Where each variant's picks land on positive slides (``focus_diagnostic``), beside random picks."""
    rows = [(name, v["landing"]["positive"]) for name, v in abl["variants"].items() if v.get("landing")]
    if not rows:
        return []
    lines = [
        "",
        "### Where the picks land (positive test slides)",
        "",
        "Share of each layer's picks on tumour, mimic, normal tissue and glass (a pick is on tumour or on a "
        "mimic when its overlap reaches the next layer's `label_overlap`), mean over the seeds; in brackets, "
        "K tissue patches picked at random in the same regions (`smt-monai benchmark focus-diagnostic`).",
        "",
        "| variant | " + " | ".join(f"layer {layer} {c}" for layer in (1, 2) for c in LANDING_ORDER) + " |",
        "|---|" + "---:|" * (2 * len(LANDING_ORDER)),
    ]
    for name, positive in rows:
        cells = [
            f"{_f(positive[layer]['model'][c], 2)} ({_f(positive[layer]['random'][c], 2)})"
            for layer in ("layer1", "layer2")
            for c in LANDING_ORDER
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ablation_section(
    abl: dict[str, Any], plot_dir: Path, doc_dir: Path, plot_name: str = "accuracy_vs_k.png"
) -> list[str]:
    """The variants (mean and standard deviation over seeds), where their picks land, and the K sweep (its
    plot ``plot_name``)."""
    configs = " + ".join(["train.yaml", *abl.get("smt_overlays", [])])
    lines = [
        "## Ablations (paper Table 2 and Figure 3)",
        "",
        f"Cohort {_cohort(abl)}, every variant merged over `{configs}` with the base overrides "
        f"`{json.dumps(abl['smt_overrides'])}`; mean +- standard deviation over the seeds of each variant, "
        "on the testing split"
        + _extra_test_slides(abl)
        + ". The paper's rows are `paper.yaml` (Table 2); `paper + X` adds one of the project's departures "
        "to it, `default - X` takes one out of the default. " + FOCUS_NOTE,
        "",
        "| variant | settings | seeds | AUC | balanced accuracy | focus hit rate | focus top-1 | "
        "focus region precision | layer-1 bal. acc. |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(entry: dict[str, Any] | None) -> str:
        if not entry or entry["mean"] is None:
            return "n/a"
        return f"{entry['mean']:.3f} +- {entry['std']:.3f}"

    def focus(v: dict[str, Any], name: str) -> str:
        chance = (v.get(f"{name}_chance") or {}).get("mean")
        return ms(v.get(name)) + ("" if chance is None else f" ({chance:.3f})")

    for name, v in abl["variants"].items():
        seeds = ", ".join(str(s) for s in v.get("seeds", abl["seeds"]))
        focus_cells = " | ".join(
            focus(v, m) for m in ("focus_hit_rate", "focus_top1", "focus_region_precision")
        )
        lines.append(
            f"| {name} | {_settings(v)} | {seeds} | {ms(v.get('auc'))} | {ms(v.get('balanced_accuracy'))} | "
            f"{focus_cells} | {ms(v.get('balanced_accuracy_layer1'))} |"
        )
    lines += _landing_section(abl)
    sweep = abl.get("k_sweep", [])
    if sweep:
        lines += [
            "",
            "### Accuracy and time against K (default model)",
            "",
            "| K | regions | AUC | balanced accuracy | focus hit rate | s / slide |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for p in sweep:
            lines.append(
                f"| {p['k']} | {p['regions']} | {_f(p['auc'])} | {_f(p['balanced_accuracy'])} | "
                f"{_with_chance(p, 'focus_hit_rate')} | {_f(p['seconds_per_slide'])} |"
            )
        image = _plot_accuracy_vs_k(sweep, plot_dir / plot_name)
        lines += ["", f"![accuracy and time against K]({os.path.relpath(image, doc_dir)})"]
    return lines + [""]


def _plot_time_vs_size(points: list[dict[str, Any]], k: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [p["size"] / 1000 for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sizes, [p[f"smt_seconds_k{k}"] for p in points], "o-", label=f"SMT, K = {k}")
    ax.plot(sizes, [p["dense_seconds"] for p in points], "s--", label="dense (ResNet-18 + MIL)")
    ax.set(xlabel="slide side (1000 px)", ylabel="seconds per slide", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_accuracy_vs_k(points: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [p["k"] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("auc", "AUC")):
        ax.plot(ks, [p[key] if p[key] is not None else float("nan") for p in points], "o-", label=label)
    ax.set(xlabel="K (regions focused per layer)", ylabel="score", xscale="log", ylim=(0, 1.05))
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xticks([], minor=True)
    twin = ax.twinx()
    twin.plot(ks, [p["seconds_per_slide"] for p in points], "k:", marker="x", label="s / slide")
    twin.set_ylabel("seconds per slide")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    out: str | os.PathLike,
    speed_json: str | os.PathLike | None,
    accuracy_json: str | os.PathLike | None,
    ablation_json: str | os.PathLike | Sequence[str | os.PathLike] | None,
    notes: str | os.PathLike | None = None,
    gpu_speed_json: str | os.PathLike | None = None,
    throughput_json: str | os.PathLike | None = None,
) -> Path:
    """Write the benchmark page ``out`` (plots beside it in ``<out stem>/``); returns its path.

    Args:
        out: the Markdown file (``docs/benchmarks.md``).
        speed_json, accuracy_json, ablation_json: the benchmarks' ``--json`` outputs (missing: said so);
            ``ablation_json`` may list several (e.g. the default cohort and one drawn with
            ``--low-mag-tumour-contrast``), each with its section.
        notes: a Markdown file of hand-written findings inserted after the tables (optional).
        gpu_speed_json: ``scripts/bench_gpu.sh``'s speed figures from a CUDA machine (optional: only said to
            be missing when given and absent).
        throughput_json: ``smt-monai benchmark throughput``'s figures (optional, as ``gpu_speed_json``).
    """
    out = Path(out)
    plot_dir = out.parent / out.stem
    speed, acc = _load(speed_json), _load(accuracy_json)
    single = ablation_json is None or isinstance(ablation_json, (str, os.PathLike))
    ablations = [_load(path) for path in ([ablation_json] if single else ablation_json)]
    gpu, rate = _load(gpu_speed_json), _load(throughput_json)
    lines = [
        "# Benchmarks",
        "",
        "SMT against the standard dense pipeline (every tissue tile at level 0 through ResNet-18, attention "
        "MIL), on the same slides, reader and threads. Generated by `python scripts/benchmark.py` "
        "(`smt-monai benchmark speed|accuracy|ablation|report`); do not edit by hand.",
        "",
        "## Runs",
        "",
    ]
    runs = [("speed", speed), ("accuracy", acc)]
    runs += [(f"ablation {n}" if len(ablations) > 1 else "ablation", a) for n, a in enumerate(ablations, 1)]
    if gpu_speed_json is not None:
        runs.insert(1, ("speed on a GPU (`scripts/bench_gpu.sh`)", gpu))
    if throughput_json is not None:
        runs.insert(1, ("throughput", rate))
    for name, data in runs:
        lines += _provenance(name, data) if data else [f"- **{name}**: not run"]
    lines.append("")
    if speed:
        lines += speed_section(speed, plot_dir, out.parent)
    if gpu:
        card = gpu.get("environment", {}).get("gpu", "GPU")
        lines += speed_section(gpu, plot_dir, out.parent, f"Speed on a GPU ({card})", "time_vs_size_gpu.png")
    if rate:
        lines += throughput_section(rate)
    if acc:
        lines += accuracy_section(acc)
    for n, abl in enumerate(ablations, 1):
        if abl:
            plot_name = "accuracy_vs_k.png" if n == 1 else f"accuracy_vs_k_{n}.png"
            lines += ablation_section(abl, plot_dir, out.parent, plot_name)
    if notes is not None and Path(notes).exists():
        lines += [Path(notes).read_text().rstrip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
