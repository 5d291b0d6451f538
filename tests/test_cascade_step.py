"""One full SMT training step over the three-layer cascade on random tensors (tiny preset, K = 2, batch 2):
shapes, labels, score-bank updates, every Eq. 7 term, and which parameters each loss may train."""

import pytest
import torch

from smt_monai.data.geometry import region_key
from smt_monai.focus import ScoreBank, cascade_step, class_attention, focusing_score
from smt_monai.losses import TERMS, SMTLoss
from smt_monai.networks import SMT, smt_tiny
from smt_monai.networks.layer import LayerOutput

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


def test_label_overlap_per_layer() -> None:
    """Layer 2's regions are labelled with the first threshold, layer 3's with the second."""

    def overlap(slide_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return torch.where(boxes[:, 2] > 1000.0, 0.05, 0.5).to(torch.float64)  # layer 2: 0.05, layer 3: 0.5

    labels = {}
    for thresholds in ((0.01, 0.1), (0.1, 0.6), 0.3):
        step = _step(smt_tiny().train(), ScoreBank(), RandomReader(), label_overlap=thresholds)
        assert step.labels[1].tolist() == [1, 1, 0, 0, 0, 0]  # no annotation: slide labels
        step = _step(
            smt_tiny().train(), ScoreBank(), RandomReader(), region_overlap=overlap, label_overlap=thresholds
        )
        labels[thresholds] = (step.labels[1][:2].tolist(), step.labels[2][:2].tolist())
    assert labels[(0.01, 0.1)] == ([1, 1], [1, 1])
    assert labels[(0.1, 0.6)] == ([0, 0], [0, 0])
    assert labels[0.3] == ([0, 0], [1, 1])
    with pytest.raises(ValueError, match="label_overlap"):
        _step(smt_tiny().train(), ScoreBank(), RandomReader(), label_overlap=(0.1, 0.2, 0.3))


def test_guide_shows_the_next_layers_the_annotated_tumour() -> None:
    """With guide=1 every annotated region that holds tumour outside its top K - 1 hands a tumour patch to
    the next layer, so layers 2 and 3 get positive regions whatever the untrained focus picks; slides
    without annotation are not guided."""

    def overlap(slide_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        # slide 0 annotated, tumour in a 200-px square at (5000, 5000); slide 1 unannotated
        lo = torch.clamp(torch.maximum(boxes[:, 0], torch.tensor(5000.0)), max=5200.0)
        hi = torch.clamp(torch.minimum(boxes[:, 0] + boxes[:, 2], torch.tensor(5200.0)), min=5000.0)
        top = torch.clamp(torch.maximum(boxes[:, 1], torch.tensor(5000.0)), max=5200.0)
        bottom = torch.clamp(torch.minimum(boxes[:, 1] + boxes[:, 2], torch.tensor(5200.0)), min=5000.0)
        fraction = (hi - lo) * (bottom - top) / boxes[:, 2] ** 2
        return torch.where(slide_index == 0, fraction.to(torch.float64), float("nan"))

    for seed in range(5):
        torch.manual_seed(seed)
        step = cascade_step(
            smt_tiny().train(),
            torch.randn(BATCH, 3, SIDE, SIDE),
            BOXES,
            torch.tensor([1, 0]),
            SLIDES,
            RandomReader(),
            SMTLoss(),
            ScoreBank(),
            LAMBDA_FWD,
            LAMBDA_BWD,
            num_focus=K,
            region_overlap=overlap,
            label_overlap=(0.001, 0.001),
            guide=1.0,
        )
        # layer 1 of slide 0 (6400 px, patches of 1600): the tumour lies in patch 15 (x, y >= 4800)
        assert 15 in step.selections[0].index[0, :K].tolist()
        assert step.labels[1][:K].sum() >= 1  # a positive layer-2 region
        assert step.labels[2][: K * (K + 1)].sum() >= 1  # and layer 3 gets one from it (slide 0 rows)
        assert step.labels[1][(K + 1) :].eq(0).all()  # slide 1: negative slide, no annotation


class PatchLocalLayer(torch.nn.Module):
    """An SMT layer whose outputs depend on patch contents only, not on where the patches are: what it
    computes is the same for any flip or quarter turn of its input once patch outputs are put back."""

    def __init__(self, grid: int, focus: bool) -> None:
        super().__init__()
        self.grid, self.focus = grid, focus
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> LayerOutput:
        means = torch.nn.functional.adaptive_avg_pool2d(x.mean(1), self.grid).flatten(1)  # (B, N)
        tokens = torch.cat([means.new_zeros(len(x), 1), means], dim=1)  # class token first
        attn = torch.softmax(self.scale * tokens, dim=1)[:, None, None, :].expand(-1, 1, tokens.shape[1], -1)
        pooled = (attn[:, 0, 0] * tokens).sum(1, keepdim=True)
        logits = torch.cat([-pooled, pooled], dim=1)
        patch_embeddings = torch.stack([means, means.square()], dim=-1)
        q = torch.sigmoid(self.scale * means) if self.focus else None
        return LayerOutput(logits, logits.softmax(1), pooled.expand(-1, 2), patch_embeddings, q, attn)


class PatchLocalSMT(torch.nn.Module):
    grid = GRID

    def __init__(self) -> None:
        super().__init__()
        self.layer1, self.layer2 = PatchLocalLayer(GRID, True), PatchLocalLayer(GRID, True)
        self.layer3 = PatchLocalLayer(GRID, False)


def _box_reader(slide_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Images that depend on the box alone, so two runs that select the same boxes read the same pixels."""
    images = []
    for box in torch.as_tensor(boxes):
        generator = torch.Generator().manual_seed(int(box.sum()) % 2**31)
        images.append(torch.rand(3, SIDE, SIDE, generator=generator))
    return torch.stack(images)


def test_augmented_step_selects_and_scores_as_unaugmented() -> None:
    """With a patch-local model the random flips and quarter turns change nothing the cascade decides:
    same boxes at every layer, same score bank, same losses (so the patch outputs were mapped back)."""
    model = PatchLocalSMT()
    steps, banks = [], []
    for augment in (False, True):
        bank = ScoreBank(eps=0.9)
        steps.append(_step(model, bank, _box_reader, augment=augment))
        banks.append(bank.state_dict())
    plain, augmented = steps
    for a, b in zip(plain.boxes, augmented.boxes):
        torch.testing.assert_close(a, b)
    for a, b in zip(plain.outputs, augmented.outputs):
        torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings)
    assert banks[0]["keys"] == banks[1]["keys"]
    torch.testing.assert_close(banks[1]["scores"], banks[0]["scores"])
    for name, value in plain.losses.items():
        torch.testing.assert_close(augmented.losses[name], value, msg=name)


@pytest.mark.parametrize("source", ["score", "attention"])
def test_focus_source_decides_the_top_k(source: str) -> None:
    """The ablations of Table 2: top-K by the Eq. 2 score or by class attention instead of q; L_ret still
    teaches q on the patches so chosen."""
    torch.manual_seed(0)
    model = smt_tiny().train()
    step = _step(model, ScoreBank(eps=0.9), RandomReader(), focus_source=source)
    first = step.outputs[0]
    if source == "score":
        ranking = focusing_score(first.probs, first.attn)
    else:
        ranking = class_attention(first.attn)
    assert step.selections[0].index[:, :K].tolist() == torch.topk(ranking, K).indices.tolist()
    assert step.selections[0].index[:, :K].tolist() != torch.topk(first.q, K).indices.tolist()
    assert torch.isfinite(step.losses["ret1"])
    with pytest.raises(ValueError, match="focus_source"):
        _step(model, ScoreBank(), RandomReader(), focus_source="gradcam")
