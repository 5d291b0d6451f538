"""Slide lists: MONAI decathlon datalists, CSV files, folders of slides and plain text lists.

Training and evaluation read a decathlon-style JSON (``training`` / ``validation`` / ``testing`` splits of
``{"image", "label", "annotation"}`` entries, as MONAI's ``load_decathlon_datalist`` reads them). Inference
also accepts a CSV with an ``image`` column (``label`` optional), a folder of slides, or a text file with
one path per line. Relative paths resolve against ``dataset_dir`` (default: the list's own folder).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smt_monai.data.annotations import unknown_annotation_classes
from smt_monai.data.errors import UserError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
TEXT_LIST_SUFFIXES = ("", ".txt", ".lst", ".list")
"""Suffixes of a text file of slide paths, one per line; any other file is neither slide nor list."""


class DatalistError(UserError, ValueError):
    """A datalist that cannot be used; the message lists every problem found, not only the first."""


def _resolve(path: str, base: Path) -> str:
    return str(Path(path) if os.path.isabs(path) else base / path)


def load_datalist(
    datalist: str | os.PathLike,
    split: str = "training",
    dataset_dir: str | os.PathLike | None = None,
    require_label: bool = True,
    check_files: bool = True,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Entries of one split of a decathlon datalist, with absolute ``image`` and ``annotation`` paths.

    An entry may also hold a survival ``time`` (>= 0, any unit) and ``event`` (1: the event was observed, 0:
    censored), read as floats and ints, for the concordance index of prognosis.

    Args:
        datalist: the JSON file.
        split: key of the split (``training``, ``validation``, ``testing`` or any other key).
        dataset_dir: folder relative paths resolve against; defaults to the datalist's folder.
        require_label: every entry must hold an integer ``label``.
        check_files: every ``image`` (and ``annotation``, when given) must exist.
        num_classes: the model's classes: every label must lie in ``0 .. num_classes - 1`` (checked here,
            before training or evaluation starts, rather than as an index error inside the loss); default:
            ``len(class_names)``.
        class_names: the model's class names: for a grading model (more than two), every annotation's
            polygon classes must be among them (``unknown_annotation_classes``).

    Raises:
        DatalistError: the file is missing or malformed, the split is absent, or entries lack keys, point
            to missing files, hold labels the model has no class for, annotations it cannot read, or a
            malformed ``time`` / ``event``; the message lists all of them, each naming its slide.
    """
    path = Path(datalist)
    if not path.is_file():
        raise DatalistError(f"{path}: datalist file does not exist")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatalistError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(content, dict):
        raise DatalistError(
            f"{path}: a JSON {type(content).__name__}, not a datalist of splits: give "
            f'{{"{split}": [{{"image": ...}}, ...]}} (MONAI\'s decathlon form)'
        )
    if split not in content:
        raise DatalistError(f"{path}: no split {split!r} (found {sorted(content)})")
    base = Path(dataset_dir) if dataset_dir else path.parent
    entries = content[split]
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    return validate_entries(
        entries, f"{path} [{split}]", base, require_label, check_files, num_classes, class_names
    )


def numbered_class_names(num_classes: int) -> list[str]:
    """``class_0 .. class_<C-1>``: the names of classes nobody named."""
    return [f"class_{c}" for c in range(int(num_classes))]


def class_names(datalist: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names from a datalist's ``labels`` map (``{"0": "negative", "1": "tumour"}``, as MONAI's
    decathlon datalists and ``smt-monai synth`` write it); ``class_<c>`` where it names none."""
    try:
        labels = json.loads(Path(datalist).read_text()).get("labels", {})
    except (OSError, ValueError, AttributeError):
        labels = {}
    names = labels if isinstance(labels, dict) else {}
    return [str(names.get(str(c), default)) for c, default in enumerate(numbered_class_names(num_classes))]


def _class_number(label: Any, class_names: Sequence[str] | None) -> int:
    """A label as its class number: an integer (or its text), or a class's name in any case (a reference
    table's ``Tumor``, where the datalist's ``labels`` name class 1 ``tumor``).

    Raises:
        ValueError: neither.
    """
    if isinstance(label, str) and class_names:
        names = [name.strip().lower() for name in class_names]
        if label.strip().lower() in names:
            return names.index(label.strip().lower())
    if isinstance(label, bool) or (isinstance(label, float) and not label.is_integer()):
        raise ValueError(f"not a class number: {label!r}")
    return int(label)


def validate_entries(
    entries: Any,
    source: str,
    base: Path,
    require_label: bool,
    check_files: bool,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Resolve paths and check every entry; raise one :class:`DatalistError` listing all problems."""
    if not isinstance(entries, list):
        raise DatalistError(f"{source}: expected a list of entries, got {type(entries).__name__}")
    problems: list[str] = []
    resolved: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            problems.append(f"entry {i}: missing key 'image'")
            continue
        item = dict(entry)
        item["image"] = _resolve(str(item["image"]), base)
        if item.get("annotation"):
            item["annotation"] = _resolve(str(item["annotation"]), base)
        if "label" in item and item["label"] not in (None, ""):
            try:
                item["label"] = _class_number(item["label"], class_names)
            except (TypeError, ValueError):
                known = f" nor one of the classes {list(class_names)}" if class_names else ""
                problems.append(
                    f"entry {i} ({item['image']}): label {item['label']!r} is not a class number{known}"
                )
            else:
                if num_classes is not None and not 0 <= item["label"] < num_classes:
                    problems.append(
                        f"entry {i} ({item['image']}): label {item['label']} is not one of the model's "
                        f"{num_classes} classes (0 to {num_classes - 1})"
                    )
        elif require_label:
            problems.append(f"entry {i} ({item['image']}): missing key 'label'")
        else:
            item.pop("label", None)
        problems += _survival(item, f"entry {i} ({item['image']})")
        if check_files:
            for key in ("image", "annotation"):
                if item.get(key) and not os.path.exists(item[key]):
                    problems.append(f"entry {i}: {key} file not found: {item[key]}")
        if class_names is not None and item.get("annotation") and os.path.exists(item["annotation"]):
            try:
                unknown = unknown_annotation_classes(item["annotation"], class_names)
            except ValueError as exc:
                unknown = str(exc)
            if unknown:
                problems.append(f"entry {i} ({item['image']}): {unknown}")
        resolved.append(item)
    if problems:
        raise DatalistError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return resolved


def _survival(item: dict[str, Any], what: str) -> list[str]:
    """Parse an entry's ``time`` and ``event`` in place (both or neither); the problems found."""
    given = [key for key in ("time", "event") if item.get(key) not in (None, "")]
    if not given:
        return []
    if len(given) == 1:
        return [f"{what}: survival needs both 'time' and 'event', found only {given[0]!r}"]
    try:
        time, event = float(item["time"]), float(item["event"])
    except (TypeError, ValueError):
        return [f"{what}: time {item['time']!r} and event {item['event']!r} must be numbers"]
    if not time >= 0 or event not in (0.0, 1.0):
        return [f"{what}: time must be >= 0 and event 0 (censored) or 1 (observed), got {time}, {event:g}"]
    item["time"], item["event"] = time, int(event)
    return []


def folder_slides(folder: str | os.PathLike) -> list[Path]:
    """The slide files in ``folder`` and its subfolders (an archive by year, patient or case), in path order.

    Hidden names are skipped: macOS writes a ``._NAME.svs`` resource fork beside each slide copied to a
    network or exFAT drive, which is not a slide, and an OUT's ``.locks`` folder is not either. Symbolic
    links to files are followed; links to folders are not, so a link back up cannot loop.
    """
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [
            Path(root) / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in SLIDE_SUFFIXES
        ]
    return sorted(found)


def load_slide_list(
    source: str | os.PathLike, datalist_key: str = "testing", dataset_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Slides to run inference on, from one slide file, a datalist JSON, a CSV, a folder or a text file.

    Files in a list are not required to exist: inference reports a missing slide as an error row and goes on.
    """
    path = Path(source)
    if path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES:
        return [{"image": str(path)}]
    if path.is_dir():
        slides = folder_slides(path)
        if not slides:
            raise DatalistError(
                f"{path}: neither the folder nor its subfolders hold slide files "
                f"({', '.join(SLIDE_SUFFIXES)})"
            )
        return [{"image": str(p)} for p in slides]
    if not path.is_file():
        raise DatalistError(f"{path}: slide list does not exist")
    base = Path(dataset_dir) if dataset_dir else path.parent
    if path.suffix.lower() == ".json":
        return load_datalist(path, datalist_key, base, require_label=False, check_files=False)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise DatalistError(f"{path}: CSV needs an 'image' column (found {reader.fieldnames})")
            rows = [
                {k: v for k, v in row.items() if k in ("image", "label", "annotation") and v}
                for row in reader
            ]
        return validate_entries(rows, str(path), base, require_label=False, check_files=False)
    if path.suffix.lower() not in TEXT_LIST_SUFFIXES:
        raise DatalistError(
            f"{path}: neither a slide ({', '.join(SLIDE_SUFFIXES)}) nor a slide list (.json, .csv, "
            f"{', '.join(s for s in TEXT_LIST_SUFFIXES if s)} or no suffix)"
        )
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except UnicodeDecodeError:
        raise DatalistError(f"{path}: a slide list must be text, one path per line") from None
    return validate_entries(
        [line for line in lines if line and not line.startswith("#")], str(path), base, False, False
    )
