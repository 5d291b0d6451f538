"""Tests of smt_monai.focus: the Eq. 2 score (against finite differences), Eq. 3 normalisation, the score
bank, top-K selection with the extra benign region, next-layer labels, and the flips / quarter turns of the
training inputs with patch outputs mapped back."""

import io

import numpy as np
import pytest
import torch

from smt_monai.data.geometry import child_boxes
from smt_monai.focus import (
    ScoreBank,
    focusing_score,
    minmax_normalize,
    next_labels,
    positive_mass,
    select_regions,
)
from smt_monai.focus.dihedral import apply_transform, random_transforms, restore_patch_order, transform_batch
from smt_monai.networks import smt_tiny

GRID, SIDE = 4, 64


def test_focusing_score_matches_finite_differences() -> None:
    """g_i = sum_{h, j >= 1} dP/d alpha_{j,i}: perturbing column i of alpha (all heads, the patch output rows
    j = 1..L^2) by delta changes the positive mass by delta * g_i to first order; the class token's row,
    left out as Eq. 2 writes it, would change the score."""
    torch.manual_seed(0)
    layer = smt_tiny(num_classes=3).layer1.double().eval()
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    out = layer(x)
    g = focusing_score(out.probs, out.attn)
    assert g.shape == (2, GRID * GRID) and g.dtype == torch.float64

    column: list[int] = []
    delta = 1e-6
    hook = layer.first_block.attn.attn_drop.register_forward_hook(
        lambda module, inputs, alpha: alpha + delta * _column_mask(alpha, column[0])
    )
    try:
        with torch.no_grad():
            for token in range(1, 1 + GRID * GRID):
                column[:] = [token]
                plus = positive_mass(layer(x).probs)
                delta = -delta
                minus = positive_mass(layer(x).probs)
                delta = -delta
                fd = (plus - minus) / (2 * delta)
                torch.testing.assert_close(fd, g[:, token - 1], rtol=1e-5, atol=1e-9)
    finally:
        hook.remove()
    assert g.abs().max() > 1e-6
    with_class_row = torch.autograd.grad(positive_mass(out.probs).sum(), out.attn)[0].sum(dim=(1, 2))[:, 1:]
    assert not torch.allclose(with_class_row, g)


def _column_mask(alpha: torch.Tensor, token: int) -> torch.Tensor:
    """Column ``token`` of the patch output rows ``j = 1..L^2`` (Eq. 2 does not sum the class token's row)."""
    mask = torch.zeros_like(alpha)
    mask[..., 1:, token] = 1.0
    return mask


def test_focusing_score_keeps_graph_and_needs_grad() -> None:
    model = smt_tiny()
    out = model.layer1(torch.randn(2, 3, SIDE, SIDE))
    focusing_score(out.probs, out.attn)
    out.logits.sum().backward()  # retain_graph=True lets the training step backpropagate afterwards
    assert model.layer1.head.weight.grad is not None
    with torch.no_grad():
        frozen = model.layer1(torch.randn(1, 3, SIDE, SIDE))
    with pytest.raises(RuntimeError, match="grad"):
        focusing_score(frozen.probs, frozen.attn)


def test_minmax_normalize() -> None:
    s = torch.tensor([[1.0, 3.0, 2.0], [-1.0, -1.0, -1.0]])
    out = minmax_normalize(s)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]))
    assert not torch.isnan(out).any()


def test_score_bank_ensemble() -> None:
    bank = ScoreBank(eps=0.9)
    g1, g2 = torch.tensor([[1.0, 2.0], [4.0, 0.0]]), torch.tensor([[3.0, 1.0]])
    s = bank.update(["a", "b"], g1)
    torch.testing.assert_close(s, 0.1 * g1)  # first observation: S(0) = 0
    s = bank.update(["a"], g2)
    torch.testing.assert_close(s, 0.9 * 0.1 * g1[:1] + 0.1 * g2)
    torch.testing.assert_close(bank.get(["b", "a"]), torch.stack([0.1 * g1[1], s[0]]))
    assert len(bank) == 2 and "a" in bank and "c" not in bank
    bank.update(["c", "c"], g2.expand(2, 2))  # a key repeated in a batch is updated once per row
    torch.testing.assert_close(bank.get(["c"]), 0.9 * 0.1 * g2 + 0.1 * g2)
    with pytest.raises(KeyError):
        bank.get(["missing"])
    with pytest.raises(ValueError, match="scores per region"):
        bank.update(["d"], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="expected g"):
        bank.update(["d", "e"], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="eps"):
        ScoreBank(eps=1.0)


def test_score_bank_state_dict_round_trip() -> None:
    bank = ScoreBank()
    for i in range(40):  # grows past the initial capacity
        bank.update([f"k{i}"], torch.full((1, 4), float(i)))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = ScoreBank()
    restored.load_state_dict(torch.load(buffer))
    keys = [f"k{i}" for i in range(40)]
    torch.testing.assert_close(restored.get(keys), bank.get(keys))
    capped = ScoreBank(max_entries=5)
    capped.load_state_dict(bank.state_dict())
    assert len(capped) == 5 and "k39" in capped and "k34" not in capped


def test_score_bank_lru_cap_and_dtype() -> None:
    bank = ScoreBank(max_entries=2, dtype=torch.bfloat16)
    g = torch.full((1, 3), 1e-9)
    bank.update(["a"], g)
    bank.update(["b"], g)
    bank.get(["a"])  # "a" becomes the most recently used
    bank.update(["c"], g)
    assert "b" not in bank and "a" in bank and "c" in bank and len(bank) == 2
    assert bank.get(["c"])[0, 0].item() == pytest.approx(1e-10, rel=1e-2)  # bfloat16 keeps tiny gradients
    assert bank.state_dict()["scores"].dtype == torch.bfloat16


def test_select_regions_top_k_and_benign() -> None:
    q = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.1, 0.2, 0.3]])
    parent = torch.tensor([[0.0, 0.0, 200.0], [1000.0, 500.0, 40.0]], dtype=torch.float64)
    sel = select_regions(parent, q, num_focus=2, grid=2)
    assert sel.index.tolist() == [[1, 2], [0, 3]]
    assert sel.focusable.all() and sel.boxes.dtype == torch.float64
    torch.testing.assert_close(
        sel.boxes[0], torch.tensor([[100.0, 0.0, 100.0], [0.0, 100.0, 100.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(sel.boxes, child_boxes(parent, sel.index, 2))

    # The lowest S~ of row 0 is patch 1, which is in the top-K: the benign patch is the next lowest (3).
    s_norm = torch.tensor([[0.5, 0.0, 1.0, 0.2], [1.0, 0.3, 0.0, 0.6]])
    sel = select_regions(parent.numpy(), q, num_focus=2, grid=2, benign_score=s_norm)
    assert sel.index.tolist() == [[1, 2, 3], [0, 3, 2]]
    assert sel.focusable.tolist() == [[True, True, False]] * 2
    np.testing.assert_allclose(sel.boxes[1, 2].numpy(), [1000.0, 520.0, 20.0])
    with pytest.raises(ValueError, match="cannot select"):
        select_regions(parent, q, num_focus=4, grid=2, benign_score=s_norm)
    with pytest.raises(ValueError, match="expected q"):
        select_regions(parent, q, num_focus=1, grid=3)


def test_select_regions_per_group_and_valid_patches() -> None:
    """Regions sharing a group pick K together (a slide's layer-1 fields); invalid patches (glass, padding)
    are picked only after every valid one, and never explored to or chosen as the extra benign region."""
    q = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.95, 0.2, 0.3], [0.5, 0.4, 0.3, 0.2]])
    parent = torch.tensor([[0.0, 0.0, 200.0], [200.0, 0.0, 200.0], [0.0, 0.0, 40.0]], dtype=torch.float64)
    sel = select_regions(parent, q, num_focus=3, grid=2, group=np.array([7, 7, 3]))
    assert sel.index.tolist() == [[1, 1, 2], [0, 1, 2]]
    assert sel.parent.tolist() == [[1, 0, 0], [2, 2, 2]]
    torch.testing.assert_close(sel.boxes[0, 0], torch.tensor([300.0, 0.0, 100.0], dtype=torch.float64))
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1, 1] = valid[0, 1] = False  # the two highest patches of group 7 are glass
    sel = select_regions(parent, q, 3, 2, group=np.array([7, 7, 3]), valid=valid, benign_score=q)
    assert sel.index[0].tolist() == [2, 0, 3, 0] and sel.parent[0].tolist() == [0, 1, 1, 0]
    valid = torch.zeros(3, 4, dtype=torch.bool)
    valid[:, 0] = True  # one valid patch per region: the rest follow by q
    sel = select_regions(parent, q, 2, 2, valid=valid, benign_score=q)
    assert sel.index.tolist() == [[0, 1, 3], [0, 1, 2], [0, 1, 3]]
    generator = torch.Generator().manual_seed(0)
    explored = select_regions(parent.expand(3, 3), q, 2, 2, valid=valid, explore=1.0, generator=generator)
    assert explored.index[:, 1].tolist() == [1, 1, 1]  # no valid patch to explore to: greedy


def test_select_regions_spread_keeps_picks_apart() -> None:
    """``spread``: the top K skips patches touching an earlier pick (also across the fields of a group), and
    takes the skipped ones in order only when no patch apart from the picks is left."""
    q = torch.zeros(1, 16)
    q[0, [0, 1, 5, 10, 4, 15]] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # a blob at 0, 1, 4, 5
    box = torch.tensor([[0.0, 0.0, 400.0]], dtype=torch.float64)
    assert select_regions(box, q, 3, 4).index.tolist() == [[0, 1, 5]]
    assert select_regions(box, q, 3, 4, spread=True).index.tolist() == [[0, 10, 2]]  # 2 is the first apart
    valid = torch.zeros(1, 16, dtype=torch.bool)
    valid[0, [0, 1, 5]] = True  # nothing apart from patch 0: the touching ones follow in order
    assert select_regions(box, q, 3, 4, valid=valid, spread=True).index.tolist() == [[0, 1, 5]]
    # two fields side by side, one group: field 0's patch 3 (right edge) touches field 1's patch 0
    fields = torch.tensor([[0.0, 0.0, 400.0], [400.0, 0.0, 400.0]], dtype=torch.float64)
    two = torch.zeros(2, 16)
    two[0, 3], two[1, 0], two[1, 10] = 0.9, 0.8, 0.7
    sel = select_regions(fields, two, 2, 4, group=np.array([0, 0]), spread=True)
    assert sel.parent.tolist() == [[0, 1]] and sel.index.tolist() == [[3, 10]]


def test_select_regions_explores_outside_the_top_k() -> None:
    """explore=1: the K-th pick of every region is a random patch outside the top K - 1, each reachable;
    the first K - 1 stay the top by q; the benign patch is still outside all picks."""
    q = torch.linspace(1.0, 0.0, 9).expand(200, 9)  # patch i has the (i + 1)-th highest q
    parent = torch.tensor([[0.0, 0.0, 90.0]], dtype=torch.float64).expand(200, 3)
    generator = torch.Generator().manual_seed(0)
    sel = select_regions(parent, q, 3, 3, benign_score=1.0 - q, explore=1.0, generator=generator)
    assert (sel.index[:, :2] == torch.tensor([0, 1])).all()
    assert set(sel.index[:, 2].tolist()) == set(range(2, 9))
    assert (sel.index[:, 3] != sel.index[:, 2]).all()
    assert select_regions(parent, q, 3, 3, explore=0.0).index[:, 2].eq(2).all()
    explored = select_regions(parent, q, 3, 3, explore=0.25, generator=generator).index[:, 2] != 2
    assert 0.1 < explored.float().mean() < 0.3  # about explore * 6/7 of the regions
    with pytest.raises(ValueError, match="probability"):
        select_regions(parent, q, 3, 3, explore=1.5)


def test_select_regions_guided_by_the_annotation() -> None:
    """guide=1: the K-th pick is drawn from the target (tumour) patches outside the top K - 1, each of them
    reachable; a region without such a patch keeps its greedy pick; the top K - 1 never change."""
    q = torch.linspace(1.0, 0.0, 9).expand(300, 9)
    parent = torch.tensor([[0.0, 0.0, 90.0]], dtype=torch.float64).expand(300, 3)
    target = torch.zeros(300, 9, dtype=torch.bool)
    target[:200, [0, 5, 7]] = True  # patch 0 is already a top pick: only 5 and 7 are left to guide to
    generator = torch.Generator().manual_seed(0)
    sel = select_regions(parent, q, 3, 3, guide=1.0, target=target, generator=generator)
    assert (sel.index[:, :2] == torch.tensor([0, 1])).all()
    assert set(sel.index[:200, 2].tolist()) == {5, 7}
    assert sel.index[200:, 2].eq(2).all()
    half = select_regions(parent, q, 3, 3, guide=0.5, target=target, generator=generator).index[:200, 2]
    assert 0.35 < (half != 2).float().mean() < 0.65
    assert select_regions(parent, q, 3, 3, guide=1.0).index[:, 2].eq(2).all()  # no target: greedy
    with pytest.raises(ValueError, match="target"):
        select_regions(parent, q, 3, 3, guide=1.0, target=target[:, :4])
    with pytest.raises(ValueError, match="probability"):
        select_regions(parent, q, 3, 3, guide=-0.1, target=target)


def test_next_labels() -> None:
    slide = torch.tensor([1, 0, 2])
    focusable = torch.tensor([[True, True, False]] * 3)
    # Weak supervision: slide label, extra benign region 0.
    assert next_labels(slide, focusable).tolist() == [[1, 1, 0], [0, 0, 0], [2, 2, 0]]
    nan = float("nan")
    overlap = torch.tensor([[0.1, 0.05, 0.5], [0.9, 0.0, 0.0], [nan, nan, nan]])[..., None]
    assert next_labels(slide, focusable, overlap).tolist() == [[1, 0, 1], [0, 0, 0], [2, 2, 0]]
    any_overlap = next_labels(slide, focusable, overlap, label_overlap=0.0)
    assert any_overlap.tolist() == [[1, 1, 1], [0, 0, 0], [2, 2, 0]]
    strict = next_labels(slide, focusable, overlap, label_overlap=0.2)
    assert strict.tolist() == [[0, 0, 1], [0, 0, 0], [2, 2, 0]]


def test_next_labels_of_graded_regions_take_the_highest_grade_they_reach() -> None:
    """Grading: a region is the highest class whose area (with the classes above it) reaches the label
    overlap, capped by the slide's grade; unknown overlap keeps weak supervision."""
    slide = torch.tensor([3, 2, 0, 3])
    focusable = torch.ones(4, 3, dtype=torch.bool)
    nan = float("nan")
    overlap = torch.tensor(
        [
            [
                [0.5, 0.0, 0.0],
                [0.3, 0.3, 0.15],
                [0.02, 0.05, 0.06],
            ],  # grade 1; grade 3 reached; 2 and up reached
            [[0.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.2, 0.0]],  # capped at the slide's grade 2
            [[0.0, 0.0, 0.9], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # a negative slide stays 0
            [[nan, nan, nan], [nan, nan, nan], [nan, nan, nan]],  # unannotated: the slide label
        ]
    )
    assert next_labels(slide, focusable, overlap).tolist() == [[1, 3, 2], [2, 0, 2], [0, 0, 0], [3, 3, 3]]


@pytest.mark.parametrize("transform", range(8))
def test_restore_patch_order_inverts_each_transform(transform: int) -> None:
    """A per-patch statistic of a transformed image, restored, is that of the untransformed patch."""
    torch.manual_seed(transform)
    image = torch.rand(1, 3, GRID * 8, GRID * 8)
    means = torch.nn.functional.avg_pool2d(image.mean(1), 8).flatten(1)  # (1, grid**2), row-major
    transforms = torch.tensor([transform])
    moved = torch.nn.functional.avg_pool2d(transform_batch(image, transforms).mean(1), 8).flatten(1)
    torch.testing.assert_close(restore_patch_order(moved, transforms, GRID), means)
    embeddings = torch.stack([moved, -moved], dim=-1)  # (1, grid**2, 2): trailing dimensions follow
    torch.testing.assert_close(restore_patch_order(embeddings, transforms, GRID)[..., 1], -means)


def test_transforms_are_the_eight_symmetries_of_the_square() -> None:
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = {tuple(apply_transform(image, t).flatten().tolist()) for t in range(8)}
    assert len(views) == 8
    batch = image.expand(8, 1, 4, 4)
    out = transform_batch(batch, torch.arange(8))
    for t in range(8):
        torch.testing.assert_close(out[t], apply_transform(image[0], t))
    assert set(random_transforms(400, torch.Generator().manual_seed(0)).tolist()) == set(range(8))
    with pytest.raises(ValueError, match="square"):
        transform_batch(torch.zeros(1, 3, 4, 6), torch.zeros(1, dtype=torch.long))
