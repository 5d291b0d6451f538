"""Tests of smt_monai.utils: where bfloat16 autocast is the default, atomic writes, read-ahead."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smt_monai.utils import atomic_path, fast_bf16, prefetch


def test_fast_bf16_is_on_for_cuda_and_off_where_bf16_is_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast_bf16("cuda") is True
    assert fast_bf16(torch.device("meta")) is False
    assert isinstance(fast_bf16("cpu"), bool)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert fast_bf16("cpu") is False


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_prefetch_yields_in_order_and_raises_the_producers_error() -> None:
    assert list(prefetch(iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise OSError("slide unreadable")

    items = prefetch(broken())
    assert next(items) == 1
    with pytest.raises(OSError, match="slide unreadable"):
        next(items)
