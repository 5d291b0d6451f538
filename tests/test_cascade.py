"""The cascade's walk: one full SMT training step on random images (tiny preset, K = 2, batch 2): shapes,
labels, score-bank updates, every Eq. 7 term, which parameters each loss may train; and the training walk
and the inference walk choosing the same regions for the same model and slide."""

import math

import numpy as np
import pytest
import torch

from smt_monai.cascade import CascadeTraining, predict_slide
from smt_monai.data.geometry import region_key
from smt_monai.engines import smt_param_groups
from smt_monai.focus import ScoreBank, class_attention, focusing_score
from smt_monai.losses import TERMS, SMTLoss
from smt_monai.networks import SMT, normalize_he, smt_tiny
from smt_monai.networks.layer import LayerOutput

K, BATCH, SIDE, GRID = 2, 2, 32, 4
LAMBDA_FWD, LAMBDA_BWD = (1.0, 1.0, 1.0), (0.1, 0.1)
SLIDES = ["slide_a", "slide_b"]
BOXES = torch.tensor([[0.0, 0.0, 6400.0], [100.0, 200.0, 3200.0]], dtype=torch.float64)


def random_images(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, SIDE, SIDE), dtype=torch.uint8)


class RandomReader:
    """Stands in for the region reads: random uint8 images in one chunk, recording what was asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, slide_index: np.ndarray, boxes: np.ndarray):
        self.calls.append((slide_index, boxes))
        yield np.arange(len(boxes)), random_images(len(boxes))


def _step(
    model: SMT, bank: ScoreBank, reader, num_layers: int = 3, overlap=None, device: str = "cpu", **settings
):
    torch.manual_seed(1)
    cascade = CascadeTraining(SMTLoss(), bank, num_focus=K, **settings)
    labels = torch.tensor([1, 0])
    return cascade(
        model,
        random_images(BATCH).to(device),
        BOXES,
        labels,
        SLIDES,
        reader,
        overlap,
        num_layers,
        LAMBDA_FWD,
        LAMBDA_BWD,
    )


def outputs(step) -> list[LayerOutput]:
    return [p.run.out for p in step.passes]


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
    assert [o.logits.shape[0] for o in outputs(step)] == [2, 6, 12]
    assert [len(b) for _, b in reader.calls] == [6, 12]
    assert step.passes[1].regions.slide.tolist() == [0, 0, 0, 1, 1, 1]
    assert step.labels[1].tolist() == [1, 1, 0, 0, 0, 0]  # slide label; extra benign region 0
    assert step.labels[2].tolist() == [1, 1, 0] * 2 + [0, 0, 0] * 2
    sel1 = step.passes[0].selection
    np.testing.assert_allclose(reader.calls[0][1], sel1.boxes.reshape(-1, 3).numpy())
    assert sel1.index[:, :K].tolist() == torch.topk(outputs(step)[0].q, K).indices.tolist()
    assert step.passes[1].selection.index.shape == (BATCH * K, K + 1)  # only focusable regions focus on

    # Score bank: the layer-1 regions and the focusable layer-2 regions, S = (1 - eps) g after one step.
    assert len(bank) == BATCH + BATCH * K
    assert region_key("slide_b", BOXES[1].numpy()) in bank
    assert region_key("slide_a", sel1.boxes[0, 0].numpy()) in bank
    assert region_key("slide_a", sel1.boxes[0, K].numpy()) not in bank

    losses = step.losses
    # no slide or risk head, no annotation
    assert set(TERMS) - {"slide", "risk", "ann1", "ann2"} | {"L_V", "L_F", "total"} == set(losses)
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
    assert len(reader.calls) == reads and len(step.passes) == num_layers


def test_annotations_and_no_extra_region() -> None:
    reader = RandomReader()

    def overlap(slide_index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        # slide 0 annotated: tumour in its left half; slide 1 unannotated
        left = (boxes[:, 0] + boxes[:, 2] / 2 < 3200.0).astype(np.float64)
        return np.where(slide_index == 0, left, np.nan)[:, None]

    step = _step(smt_tiny().train(), ScoreBank(), reader, extra_benign=False, overlap=overlap)
    assert [o.logits.shape[0] for o in outputs(step)] == [2, 4, 8]
    boxes = step.passes[1].regions.boxes
    expected = [int(b[0] + b[2] / 2 < 3200.0) for b in boxes[:2].tolist()] + [0, 0]
    assert step.labels[1].tolist() == expected
    assert step.passes[0].selection.focusable.all()


def test_label_overlap_per_layer() -> None:
    """Layer 2's regions are labelled with the first threshold, layer 3's with the second."""

    def overlap(slide_index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        return np.where(boxes[:, 2] > 1000.0, 0.05, 0.5)[:, None]  # layer 2: 0.05, layer 3: 0.5

    labels = {}
    for thresholds in ((0.01, 0.1), (0.1, 0.6), 0.3):
        step = _step(smt_tiny().train(), ScoreBank(), RandomReader(), label_overlap=thresholds)
        assert step.labels[1].tolist() == [1, 1, 0, 0, 0, 0]  # no annotation: slide labels
        step = _step(
            smt_tiny().train(), ScoreBank(), RandomReader(), overlap=overlap, label_overlap=thresholds
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

    def overlap(slide_index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        # slide 0 annotated, tumour in a 200-px square at (5000, 5000); slide 1 unannotated
        lo = np.clip(np.maximum(boxes[:, 0], 5000.0), None, 5200.0)
        hi = np.clip(np.minimum(boxes[:, 0] + boxes[:, 2], 5200.0), 5000.0, None)
        top = np.clip(np.maximum(boxes[:, 1], 5000.0), None, 5200.0)
        bottom = np.clip(np.minimum(boxes[:, 1] + boxes[:, 2], 5200.0), 5000.0, None)
        fraction = (hi - lo) * (bottom - top) / boxes[:, 2] ** 2
        return np.where(slide_index == 0, fraction, np.nan)[:, None]

    for seed in range(5):
        torch.manual_seed(seed)
        cascade = CascadeTraining(
            SMTLoss(), ScoreBank(), num_focus=K, label_overlap=(0.001, 0.001), guide=1.0
        )
        step = cascade(
            smt_tiny().train(),
            random_images(BATCH),
            BOXES,
            torch.tensor([1, 0]),
            SLIDES,
            RandomReader(),
            overlap,
        )
        # layer 1 of slide 0 (6400 px, patches of 1600): the tumour lies in patch 15 (x, y >= 4800)
        assert 15 in step.passes[0].selection.index[0, :K].tolist()
        assert step.labels[1][:K].sum() >= 1  # a positive layer-2 region
        assert step.labels[2][: K * (K + 1)].sum() >= 1  # and layer 3 gets one from it (slide 0 rows)
        assert step.labels[1][(K + 1) :].eq(0).all()  # slide 1: negative slide, no annotation


def test_l_ann_teaches_q_every_annotated_tissue_patch() -> None:
    """``L_ann``: on an annotated slide every tissue patch of a selecting row is taught whether the region it
    would become is positive (Eq. 4's divergence, a binary cross-entropy for 0/1 answers); unannotated slides
    add nothing; it trains the focusing predictors only (as ``L_ret``), and a few steps of it alone rank the
    annotated tumour patch first."""

    def overlap(slide_index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        # slide 0 annotated: tumour fills layer 1's patch 15 (x, y >= 4800 of 6400); slide 1 unannotated
        inside = (boxes[:, 0] >= 4800.0) & (boxes[:, 1] >= 4800.0) & (boxes[:, 0] + boxes[:, 2] <= 6400.0)
        return np.where(slide_index == 0, inside.astype(np.float64), np.nan)[:, None]

    torch.manual_seed(0)
    model = smt_tiny().train()
    images = random_images(BATCH)
    # patch 15 of slide 0: stained tissue of one colour, unlike the noise around it
    images[0, :, 24:, 24:] = torch.tensor([150, 50, 120], dtype=torch.uint8)[:, None, None]

    def step() -> object:
        cascade = CascadeTraining(SMTLoss(annotation_weight=1.0), ScoreBank(), num_focus=K)
        return cascade(model, images, BOXES, torch.tensor([1, 0]), SLIDES, RandomReader(), overlap)

    first = step()
    assert {"ann1", "ann2"} <= set(first.losses)
    q, tissue = outputs(first)[0].q[0], first.passes[0].run.tissue[0]
    assert tissue[15] and tissue.sum() > 8
    target = torch.zeros(GRID**2)
    target[15] = 1.0
    expected = torch.nn.functional.binary_cross_entropy(q[tissue], target[tissue])
    assert first.losses["ann1"].item() == pytest.approx(expected.item(), rel=1e-5)  # slide 0's row only
    assert _trained_groups(first.losses["ann1"], _groups(model)) == {"focus1"}
    assert _trained_groups(first.losses["ann2"], _groups(model)) == {"focus2"}
    no_weight = SMTLoss()({"ann1": first.losses["ann1"]}, LAMBDA_FWD, LAMBDA_BWD)
    assert no_weight["L_F"].item() == 0.0  # annotation_weight 0: the paper's objective

    optimiser = torch.optim.Adam(model.layer1.focus_head.parameters(), lr=1e-2)
    for _ in range(30):
        optimiser.zero_grad()
        step().losses["ann1"].backward()
        optimiser.step()
    assert int(step().passes[0].run.out.q[0].argmax()) == 15


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


def box_images(boxes: np.ndarray) -> torch.Tensor:
    """uint8 images that depend on the box alone, so two runs that select the same boxes read the same
    pixels."""
    images = []
    for box in np.asarray(boxes):
        generator = torch.Generator().manual_seed(int(box.sum()) % 2**31)
        images.append(torch.randint(0, 256, (3, SIDE, SIDE), generator=generator, dtype=torch.uint8))
    return torch.stack(images)


def _box_reader(slide_index: np.ndarray, boxes: np.ndarray):
    yield np.arange(len(boxes)), box_images(boxes)


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
    for a, b in zip(plain.passes, augmented.passes):
        np.testing.assert_allclose(a.regions.boxes, b.regions.boxes)
    for a, b in zip(outputs(plain), outputs(augmented)):
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
    first = outputs(step)[0]
    if source == "score":
        ranking = focusing_score(first.probs, first.attn)
    else:
        ranking = class_attention(first.attn)
    chosen = step.passes[0].selection.index[:, :K].tolist()
    assert chosen == torch.topk(ranking, K).indices.tolist()
    assert chosen != torch.topk(first.q, K).indices.tolist()
    assert torch.isfinite(step.losses["ret1"])
    with pytest.raises(ValueError, match="focus_source"):
        _step(model, ScoreBank(), RandomReader(), focus_source="gradcam")


class BoxRegions:
    """A region reader for ``predict_slide`` whose images depend on the box alone (``box_images``)."""

    def chunks(self, paths: list[str], slide_index: np.ndarray, boxes: np.ndarray):
        yield from _box_reader(slide_index, boxes)


@pytest.mark.parametrize("spread", [False, True])
def test_training_and_inference_walks_choose_the_same_regions(spread: bool) -> None:
    """The one cascade: the training walk (no flips, no exploration, no guidance) and the inference walk, on
    the same model and slide, read the same boxes at every layer (the training walk adds the extra benign
    region, which is never focused further); with ``spread_focus`` both keep layer 1's picks apart."""
    torch.manual_seed(3)
    model = smt_tiny(spread_focus=spread)
    box = BOXES[0].numpy()
    image = box_images(box[None])
    step = CascadeTraining(SMTLoss(), ScoreBank(), num_focus=K)(
        model.train(), image, box[None], torch.tensor([1]), ["slide_a"], _box_reader
    )
    prediction = predict_slide(model.eval(), {"path": "a", "image": image[0], "box": box}, BoxRegions(), K)
    for layer, done in enumerate(step.passes):
        focused = done.regions.boxes[done.regions.rank < K]
        np.testing.assert_allclose(focused, prediction.boxes[layer])
    first, second = prediction.boxes[1][:2]
    touching = bool((np.abs(first[:2] - second[:2]) < 1.5 * first[2]).all())
    if spread:
        assert not touching
    torch.testing.assert_close(
        torch.as_tensor(prediction.focus_map.ravel()),
        model.layer1(normalize_he(image)).q[0].detach(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_fields_of_one_slide_select_k_together() -> None:
    """A slide larger than one layer-1 field: its fields run as layer-1 rows and pick K patches together,
    so the slide still costs K + K^2 reads after layer 1, in training and at inference."""
    torch.manual_seed(0)
    model = smt_tiny()
    boxes = np.array([[0.0, 0.0, 3200.0], [3200.0, 0.0, 3200.0], [0.0, 0.0, 6400.0]])
    images = box_images(boxes)
    reader = RandomReader()
    step = CascadeTraining(SMTLoss(), ScoreBank(), num_focus=K, extra_benign=False)(
        model.train(), images, boxes, torch.tensor([1, 0]), SLIDES, reader, field_slide=np.array([0, 0, 1])
    )
    assert [len(b) for _, b in reader.calls] == [2 * K, 2 * K * K]
    assert step.passes[1].regions.slide.tolist() == [0] * K + [1] * K
    assert set(step.passes[1].regions.parent[:K].tolist()) <= {0, 1}
    assert all(torch.isfinite(v) for v in step.losses.values())
    regions = BoxRegions()
    view = {"path": "a", "image": images[:2], "box": boxes[:2]}
    prediction = predict_slide(model.eval(), view, regions, K)
    assert [len(b) for b in prediction.boxes] == [2, K, K * K]
    first = model.layer1(normalize_he(images[:2])).q.detach()
    chosen = torch.topk(first.reshape(-1), K).indices
    np.testing.assert_array_equal(prediction.parent[1], (chosen // GRID**2).numpy())


def test_glass_and_padding_are_never_focused() -> None:
    """A region whose right half is glass (white padding beyond the slide, or bare slide): however high ``q``
    or the score is there, neither the top-K nor the extra benign region lands on it, and Eq. 3's target is
    normalised over the tissue patches alone (0 on glass)."""
    from smt_monai.data.tissue import patch_tissue
    from smt_monai.focus import minmax_normalize

    image = torch.full((1, 3, SIDE, SIDE), 255, dtype=torch.uint8)
    image[:, 0, :, : SIDE // 2], image[:, 1, :, : SIDE // 2], image[:, 2, :, : SIDE // 2] = 220, 140, 190
    tissue = patch_tissue(image, GRID)[0].reshape(GRID, GRID)
    assert tissue[:, : GRID // 2].all() and not tissue[:, GRID // 2 :].any()

    class GlassLoving(torch.nn.Module):  # q highest on the glass half: a model that would focus on glass
        grid, read_size = GRID, SIDE

        def __init__(self) -> None:
            super().__init__()
            self.layer1 = self.layer2 = PatchLocalLayer(GRID, True)
            self.layer3 = PatchLocalLayer(GRID, False)
            with torch.no_grad():
                self.layer1.scale.fill_(-3.0)  # q falls with optical density: highest on white glass

    reader = RandomReader()
    step = CascadeTraining(SMTLoss(focus_weight=(1.0, 1.0)), ScoreBank(), num_focus=K)(
        GlassLoving().train(), image, BOXES[:1], torch.tensor([1]), ["a"], reader, num_layers=2
    )
    picked = step.passes[0].selection.index[0].tolist()  # the top K and the extra benign patch
    assert all(tissue.reshape(-1)[i] for i in picked), picked
    q = step.passes[0].run.out.q
    assert q[0, ~tissue.reshape(-1)].min() > q[0, tissue.reshape(-1)].max()  # glass scored higher by q
    score = torch.randn(1, GRID * GRID)
    score[0, ~tissue.reshape(-1)] = 100.0
    normalised = minmax_normalize(score, tissue.reshape(1, -1))
    assert normalised[0, ~tissue.reshape(-1)].eq(0).all() and normalised[0, tissue.reshape(-1)].max() == 1.0

    prediction = predict_slide(
        GlassLoving().eval(), {"path": "a", "image": image[0], "box": BOXES[0]}, BoxRegions(), K
    )
    x0, _, side = BOXES[0].tolist()
    assert (prediction.boxes[1][:, 0] < x0 + side / 2).all()  # layer 2 reads tissue only


def test_the_slide_head_learns_from_the_slide_labels_on_detached_layer3_embeddings() -> None:
    """With a slide head, the step adds ``slide`` (cross-entropy of the pooled layer-3 embeddings against the
    slide labels, weighted as layer 3's L_cls) to L_V; its gradient reaches the head and no layer."""
    model = smt_tiny(slide_head=True).train()
    step = _step(model, ScoreBank(), RandomReader())
    assert "slide" in step.losses and math.isfinite(float(step.losses["slide"].detach()))
    step.losses["slide"].backward()
    assert all(p.grad is not None for p in model.slide_head.parameters())
    assert all(p.grad is None for p in model.layer3.parameters())
    assert "slide" not in _step(model, ScoreBank(), RandomReader(), num_layers=2).losses
    grouped = [p for group in smt_param_groups(model) for p in group["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})


def test_the_risk_head_learns_the_cox_partial_likelihood_of_the_slides_with_survival() -> None:
    """With a risk head and survival in the batch, the step adds ``risk`` (the Cox partial likelihood of the
    pooled layer-3 embeddings); its gradient reaches the head and no layer; without survival there is none."""
    from smt_monai.losses import cox_partial_likelihood

    model = smt_tiny(risk_head=True).train()
    cascade = CascadeTraining(SMTLoss(), ScoreBank(), num_focus=K)
    survival = torch.tensor([[2.0, 1.0], [5.0, 0.0]])
    args = (model, random_images(BATCH), BOXES, torch.tensor([1, 0]), SLIDES, RandomReader(), None, 3)
    torch.manual_seed(1)
    step = cascade(*args, LAMBDA_FWD, LAMBDA_BWD, survival=survival)
    last = step.passes[-1]
    with torch.no_grad():
        risk = torch.cat(
            [
                model.risk_head(last.run.out.cls_embedding[torch.as_tensor(last.regions.slide == s)])[0]
                for s in (0, 1)
            ]
        )
    expected = cox_partial_likelihood(risk[:, 0], survival[:, 0], survival[:, 1])
    assert float(step.losses["risk"].detach()) == pytest.approx(float(expected), rel=1e-5)
    step.losses["risk"].backward()
    assert all(p.grad is not None for p in model.risk_head.parameters())
    assert all(p.grad is None for p in model.layer3.parameters())
    torch.manual_seed(1)
    assert "risk" not in cascade(*args, LAMBDA_FWD, LAMBDA_BWD).losses
    grouped = [p for group in smt_param_groups(model) for p in group["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_on_cuda() -> None:
    """On a GPU the batch's layer-1 images come on the device and the region reads from the CPU: the step
    keeps the tissue masks on the CPU and its losses on the device."""
    step = _step(smt_tiny().cuda().train(), ScoreBank(), RandomReader(), device="cuda")
    assert all(p.run.tissue.device.type == "cpu" for p in step.passes)
    assert step.losses["total"].device.type == "cuda" and torch.isfinite(step.losses["total"])
    step.losses["total"].backward()
