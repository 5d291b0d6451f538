"""Small shared utilities."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def numpy_simd() -> list[str]:
    """The SIMD extensions numpy dispatches to on this CPU (numpy 2.4 names them ``X86_V3``, ``X86_V4``,
    ``AVX512_ICL``, ...; empty where numpy cannot say).

    Some of its float kernels round differently per extension in the last bit, and a synthetic slide's
    pixels are rounded from such floats: the same ``smt-monai synth`` command can draw a few slides
    differently on a CPU with AVX-512 than on one with AVX2 only (2 of 60 in a measured cohort). Recorded with
    cohorts and benchmark results, so a cohort that no longer matches its results can be told apart; setting
    ``NPY_DISABLE_CPU_FEATURES`` before numpy loads draws another CPU's slides.
    """
    import numpy as np

    try:
        return list(np.show_config(mode="dicts")["SIMD Extensions"]["found"])
    except (TypeError, KeyError):  # numpy older than 1.26
        return []


def report_user_errors() -> None:
    """Make an uncaught :class:`~smt_monai.data.errors.UserError` (a bad slide list, model file, output
    folder, option) end the process with its one line and status 2, as the ``smt-monai`` command does,
    instead of a traceback; bundle configs call this in ``initialize``. The traceback is printed too with
    ``SMT_DEBUG=1``. The error may arrive wrapped (MONAI's config parser raises its own error from it)."""
    import sys
    import traceback

    from smt_monai.data.errors import UserError

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or os.environ.get("SMT_DEBUG"):
            traceback.print_exception(kind, error, trace)
        if cause is None:
            return
        print(f"error: {cause}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)

    sys.excepthook = hook


def torch_load_problem(path: str | os.PathLike, error: Exception) -> str:
    """What is wrong with a file ``torch.load(path, weights_only=True)`` refused, in one line that never
    advises loading it unsafely.

    torch's own message suggests turning weights-only loading off, which runs whatever code a crafted file
    holds; for a refused pickle only the unpickler's first sentence is kept (``Unsupported global: GLOBAL
    posix.system``).
    """
    import pickle
    import zipfile

    if isinstance(error, OSError):
        return f"cannot read it ({error.strerror or error})"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "truncated or corrupt: a zip archive without the directory at its end (an interrupted copy?)"
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (a pickle before torch 1.6)
        return f"not a file torch.save writes (it starts with {head!r})"
    if isinstance(error, pickle.UnpicklingError):
        # torch's paragraph, the unpickler's words (after this marker, or on the lines after it), torch's docs
        text, marker = str(error), "WeightsUnpickler error:"
        words = text.split(marker, 1)[1] if marker in text else text.partition("\n")[2]
        said = [line.strip() for line in words.splitlines() if line.strip() and "documentation" not in line]
        return (
            "refused: it holds Python objects other than tensors and plain data, and loading them could run "
            f"code ({said[0].split('. ')[0].rstrip('.') if said else 'not loadable with weights_only=True'})"
        )
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"truncated or corrupt ({type(error).__name__}: {first_line[:300]})"


def usable_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, checked to exist on this machine before anything is loaded onto it.

    Raises:
        OptionError: torch does not know the name, or no such GPU is visible here.
    """
    import torch

    from smt_monai.data.errors import OptionError

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"device {device!r}: not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"device {device!r}: no CUDA GPU is visible on this machine; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise OptionError(
                f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device {device!r}: Apple's MPS is not available on this machine; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"device {device!r}: smt-monai runs on cpu, cuda or mps")
    return parsed


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast speeds up networks on ``device``: the default of every ``amp`` setting.

    True on CUDA, and on a CPU whose oneDNN kernels compute in bfloat16 natively (AVX512-BF16 or AMX), where
    the SMT layers run about 2.7 times and ResNet-18 about 1.9 times faster than in float32 (measured on 2
    EPYC cores). False on other CPUs, where bfloat16 is emulated and slower than float32.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on one filesystem).

    Readers never see a half-written file, and an interrupted write leaves the previous file intact. The
    temporary file is flushed to disk before the rename and the folder after it, so that a crash or power
    loss never leaves an empty or partial file under the final name. ``suffix`` ends the temporary name, for
    writers that choose the format from it (``.nii.gz``). A killed process leaves its temporary file behind:
    :func:`remove_stale_temporaries` clears those.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # some filesystems cannot sync a folder; the rename still stands
            _fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ``.NAME.tmpPID`` and an optional suffix: the temporary names :func:`atomic_path` gives.
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>[1-9]\d*)(?P<suffix>.*)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` in ``folder`` whose writing process is gone.

    A process killed while writing (``kill -9``, out of memory, power loss) leaves ``.NAME.tmpPID...``
    behind; files of processes still running on this machine are kept. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.fullmatch(entry.name)
        if match and entry.is_file() and not _process_alive(int(match.group("pid"))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def prefetch(iterator: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Run ``iterator`` in a background thread, ``depth`` items ahead of the consumer.

    Reading the next chunk of regions (JPEG decoding and resizing release the GIL) then overlaps the
    network's work on the current one. Exceptions of the producer are raised in the consumer.
    """
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((False, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()
