"""One full SMT training step over the three-layer cascade on random tensors (tiny preset, K = 2, batch 2):
shapes, labels, score-bank updates, every Eq. 7 term, and which parameters each loss may train."""

import pytest
import torch

from smt_monai.data.geometry import region_key
from smt_monai.focus import ScoreBank, cascade_step
from smt_monai.losses import TERMS, SMTLoss
from smt_monai.networks import SMT, smt_tiny

K, BATCH, SIDE, GRID = 2, 2, 64, 4
LAMBDA_FWD, LAMBDA_BWD = (1.0, 1.0, 1.0), (0.1, 0.1)
SLIDES = ["slide_a", "slide_b"]
BOXES = torch.tensor([[0.0, 0.0, 6400.0], [100.0, 200.0, 3200.0]], dtype=torch.float64)


class RandomReader:
    """Stands in for the region reads: random images, recording what was asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, slide_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        self.calls.append((slide_index, boxes))
        return torch.randn(len(slide_index), 3, SIDE, SIDE)


def _step(model: SMT, bank: ScoreBank, reader: RandomReader, **kwargs):
    torch.manual_seed(1)
    images = torch.randn(BATCH, 3, SIDE, SIDE)
    labels = torch.tensor([1, 0])
    return cascade_step(
        model,
        images,
        BOXES,
        labels,
        SLIDES,
        reader,
        SMTLoss(),
        bank,
        LAMBDA_FWD,
        LAMBDA_BWD,
        num_focus=K,
        **kwargs,
    )


def _groups(model: SMT) -> dict[str, list[torch.nn.Parameter]]:
    """Parameter groups: encoder{l} (all but the heads), head{l} (classifier), focus{l} (f_focus)."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for level in (1, 2, 3):
        for name, param in getattr(model, f"layer{level}").named_parameters():
            if name.startswith("focus_head."):
                kind = "focus"
            elif name.startswith("head."):
                kind = "head"
            else:
                kind = "encoder"
            groups.setdefault(f"{kind}{level}", []).append(param)
    return groups


def _trained_groups(loss: torch.Tensor, groups: dict[str, list[torch.nn.Parameter]]) -> set[str]:
    """Names of the groups in which ``loss`` has a non-zero gradient."""
    names = list(groups)
    params = [p for n in names for p in groups[n]]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    trained, i = set(), 0
    for name in names:
        count = len(groups[name])
        if any(g is not None and g.abs().sum() > 0 for g in grads[i : i + count]):
            trained.add(name)
        i += count
    return trained


EXPECTED = {
    "cls1": {"encoder1", "head1"},
    "cls2": {"encoder2", "head2"},
    "cls3": {"encoder3", "head3"},
    "emb1": {"encoder1"},  # the layer-2 target is detached
    "emb2": {"encoder2"},
    "focus1": {"focus1"},  # focus_grad_to_encoder=False: f_focus reads detached embeddings
    "focus2": {"focus2"},
    "ret1": {"focus1"},  # the layer-2 probabilities are detached
    "ret2": {"focus2"},
    "L_V": {"encoder1", "encoder2", "encoder3", "head1", "head2", "head3"},
    "L_F": {"focus1", "focus2"},
}


def test_full_cascade_training_step() -> None:
    torch.manual_seed(0)
    model = smt_tiny().train()
    bank, reader = ScoreBank(eps=0.9), RandomReader()
    step = _step(model, bank, reader)

    # Layer sizes: B, B * (K + 1) with the extra benign region, B * K * (K + 1).
    assert [o.logits.shape[0] for o in step.outputs] == [2, 6, 12]
    assert [len(b) for _, b in reader.calls] == [6, 12]
    assert step.slide_index[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert step.labels[1].tolist() == [1, 1, 0, 0, 0, 0]  # slide label; extra benign region 0
    assert step.labels[2].tolist() == [1, 1, 0] * 2 + [0, 0, 0] * 2
    sel1 = step.selections[0]
    torch.testing.assert_close(reader.calls[0][1], sel1.boxes.reshape(-1, 3))
    assert sel1.index[:, :K].tolist() == torch.topk(step.outputs[0].q, K).indices.tolist()
    assert step.selections[1].index.shape == (BATCH * K, K + 1)  # only focusable layer-2 regions focus on

    # Score bank: the layer-1 regions and the focusable layer-2 regions, S = (1 - eps) g after one step.
    assert len(bank) == BATCH + BATCH * K
    assert region_key("slide_b", BOXES[1].numpy()) in bank
    assert region_key("slide_a", sel1.boxes[0, 0].numpy()) in bank
    assert region_key("slide_a", sel1.boxes[0, K].numpy()) not in bank

    losses = step.losses
    assert set(TERMS) | {"L_V", "L_F", "total"} == set(losses)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())

    groups = _groups(model)
    for name, expected in EXPECTED.items():
        assert _trained_groups(losses[name], groups) == expected, name

    losses["total"].backward()
    for name, params in groups.items():
        assert all(p.grad is not None for p in params), name
    assert model.layer1.focus_head.mlp[0].weight.grad.abs().sum() > 0  # from ret1, L_focus[1] is off


def test_focus_grad_to_encoder_lets_l_f_train_encoders() -> None:
    torch.manual_seed(0)
    model = smt_tiny(focus_grad_to_encoder=True).train()
    step = _step(model, ScoreBank(), RandomReader())
    assert _trained_groups(step.losses["L_F"], _groups(model)) == {"focus1", "focus2", "encoder1", "encoder2"}


def test_score_bank_accumulates_over_steps() -> None:
    torch.manual_seed(0)
    model = smt_tiny().train()
    bank = ScoreBank(eps=0.9)
    key = region_key("slide_a", BOXES[0].numpy())
    _step(model, bank, RandomReader(), num_layers=1)
    first = bank.get([key]).clone()
    _step(model, bank, RandomReader(), num_layers=1)
    # same weights, same input: g is the same, so S = 0.9 * 0.1 g + 0.1 g = 1.9 * first
    torch.testing.assert_close(bank.get([key]), 1.9 * first)


@pytest.mark.parametrize(
    "num_layers, terms, reads",
    [
        (1, {"cls1", "focus1"}, 0),
        (2, {"cls1", "cls2", "focus1", "focus2", "ret1", "emb1"}, 1),
    ],
)
def test_staged_activation(num_layers: int, terms: set[str], reads: int) -> None:
    reader = RandomReader()
    step = _step(smt_tiny().train(), ScoreBank(), reader, num_layers=num_layers)
    assert set(step.losses) == terms | {"L_V", "L_F", "total"}
    assert len(reader.calls) == reads and len(step.outputs) == num_layers


def test_annotations_and_no_extra_region() -> None:
    reader = RandomReader()

    def overlap(slide_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        # slide 0 annotated: tumour in its left half; slide 1 unannotated
        left = (boxes[:, 0] + boxes[:, 2] / 2 < 3200.0).to(torch.float64)
        return torch.where(slide_index == 0, left, torch.full_like(left, float("nan")))

    step = _step(smt_tiny().train(), ScoreBank(), reader, extra_benign=False, region_overlap=overlap)
    assert [o.logits.shape[0] for o in step.outputs] == [2, 4, 8]
    boxes = step.boxes[1]
    expected = [int(b[0] + b[2] / 2 < 3200.0) for b in boxes[:2].tolist()] + [0, 0]
    assert step.labels[1].tolist() == expected
    assert step.selections[0].focusable.all()
