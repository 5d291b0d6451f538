"""Layer-1 fields of a fixed side over a slide's tissue sections (``layer1_fields``)."""

from __future__ import annotations

import numpy as np
import pytest

from smt_monai.data.geometry import box_to_xyxy, layer1_fields


def covers(fields: np.ndarray, box: tuple[float, float, float, float], step: float = 1.0) -> bool:
    """Whether every point of ``box`` on a ``step`` lattice (edges included) lies in some field."""
    x0, y0, x1, y1 = box
    xs, ys = np.meshgrid(np.append(np.arange(x0, x1, step), x1), np.append(np.arange(y0, y1, step), y1))
    corners = box_to_xyxy(fields)
    inside = (
        (xs[..., None] >= corners[:, 0])
        & (xs[..., None] <= corners[:, 2])
        & (ys[..., None] >= corners[:, 1])
        & (ys[..., None] <= corners[:, 3])
    )
    return bool(inside.any(axis=-1).all())


def test_small_tissue_gets_one_field_centred_on_it() -> None:
    fields = layer1_fields(np.array([[1000.0, 2000.0, 1600.0, 2300.0]]), 4096.0)
    np.testing.assert_allclose(fields, [[1300.0 - 2048.0, 2150.0 - 2048.0, 4096.0]])


def test_large_tissue_gets_a_centred_grid_covering_it() -> None:
    box = (100.0, 50.0, 100.0 + 2.5 * 1000, 50.0 + 1.2 * 1000)
    fields = layer1_fields(np.array([box]), 1000.0)
    assert fields.shape == (3 * 2, 3) and (fields[:, 2] == 1000.0).all()
    corners = box_to_xyxy(fields)
    # overhang split evenly: 0.25 field on the left and right, 0.4 above and below
    assert corners[:, 0].min() == pytest.approx(100.0 - 250.0) and corners[:, 2].max() == pytest.approx(
        2850.0
    )
    assert corners[:, 1].min() == pytest.approx(50.0 - 400.0) and corners[:, 3].max() == pytest.approx(1650.0)
    assert covers(fields, box, step=10.0)
    # row-major: y first, then x
    assert np.all(np.diff(fields[:3, 0]) > 0) and np.all(fields[:3, 1] < fields[3:, 1].min())


def test_two_distant_sections_get_two_fields_and_two_close_ones_share_one() -> None:
    distant = np.array([[0.0, 0.0, 300.0, 200.0], [5000.0, 100.0, 5400.0, 500.0]])
    fields = layer1_fields(distant, 1000.0)
    assert len(fields) == 2
    assert all(covers(fields, tuple(b)) for b in distant)
    close = np.array([[0.0, 0.0, 300.0, 200.0], [500.0, 100.0, 900.0, 500.0]])
    fields = layer1_fields(close, 1000.0)
    np.testing.assert_allclose(fields, [[450.0 - 500.0, 250.0 - 500.0, 1000.0]])


def test_fields_cover_every_component_and_small_ones_inside_a_grid_add_none() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        origin = rng.uniform(0, 20000, (6, 2))
        size = rng.uniform(50, 3000, (6, 2))
        boxes = np.concatenate([origin, origin + size], axis=1)
        fields = layer1_fields(boxes, 1000.0)
        assert all(covers(fields, tuple(b), step=25.0) for b in boxes)
        assert len(fields) <= sum(np.ceil(w / 1000) * np.ceil(h / 1000) for w, h in size)
        np.testing.assert_array_equal(fields, layer1_fields(boxes, 1000.0))  # deterministic
    big_and_inner = np.array([[0.0, 0.0, 1500.0, 1500.0], [100.0, 100.0, 200.0, 200.0]])
    assert len(layer1_fields(big_and_inner, 1000.0)) == 4


def test_no_tissue_no_fields_and_a_bad_side_is_refused() -> None:
    assert layer1_fields(np.zeros((0, 4)), 1000.0).shape == (0, 3)
    with pytest.raises(ValueError, match="field_side"):
        layer1_fields(np.array([[0.0, 0.0, 1.0, 1.0]]), 0.0)
