"""Tests of smt_monai.losses against values computed by hand, with the edge cases of Eq. 3 and Eq. 4."""

import math

import pytest
import torch
import torch.nn.functional as F

from smt_monai.losses import (
    ClassificationLoss,
    EmbeddingDistillationLoss,
    FocusLoss,
    RecheckLoss,
    SMTLoss,
    cox_partial_likelihood,
)
from smt_monai.losses.utils import reduce_loss


def test_focus_loss_by_hand() -> None:
    q = torch.tensor([[0.2, 0.9, 0.5]], requires_grad=True)
    s = torch.tensor([[1.0, 5.0, 3.0]], requires_grad=True)  # S~ = [0, 1, 0.5]
    loss = FocusLoss()(q, s)
    assert loss.item() == pytest.approx((0.2 + 0.1 + 0.0) / 3)
    loss.backward()
    assert s.grad is None  # the bank target is a constant
    torch.testing.assert_close(q.grad, torch.tensor([[1.0, -1.0, 0.0]]) / 3)
    raw = FocusLoss(normalize=False, reduction="none")(q, torch.tensor([[0.0, 1.0, 1.0]]))
    torch.testing.assert_close(raw, torch.tensor([[0.2, 0.1, 0.5]]))


def test_focus_loss_all_equal_scores() -> None:
    q = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    loss = FocusLoss()(q, torch.full((2, 2), 7.0))
    assert not torch.isnan(loss)
    assert loss.item() == pytest.approx(0.5)  # target all zeros: mean q
    with pytest.raises(ValueError, match="differ in shape"):
        FocusLoss()(q, torch.zeros(2, 3))


def _bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_recheck_loss_by_hand() -> None:
    q = torch.tensor([[0.6, 0.3], [0.1, 0.5]], requires_grad=True)
    p = torch.tensor([[0.8, 0.3], [0.5, 0.9]], requires_grad=True)
    loss = RecheckLoss()(q, p)
    expected = [_bernoulli_kl(a, b) for a, b in [(0.8, 0.6), (0.3, 0.3), (0.5, 0.1), (0.9, 0.5)]]
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-5)
    loss.backward()
    assert p.grad is None  # the next layer is the teacher
    # dKL/dq = (q - P) / (q (1 - q)), divided by 4 for the mean
    assert q.grad[0, 0].item() == pytest.approx((0.6 - 0.8) / (0.6 * 0.4) / 4, rel=1e-5)
    per_k = RecheckLoss(reduction="none")(q, p)
    assert per_k.shape == (2, 2) and per_k[0, 1].item() == pytest.approx(0.0, abs=1e-7)


def test_recheck_loss_at_zero_and_one() -> None:
    q = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.5]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]])
    loss = RecheckLoss(reduction="none")(q, p)
    assert torch.isfinite(loss).all()
    assert loss[0, :2].abs().max().item() < 1e-5  # agreeing certainties cost nothing
    assert loss[0, 2].item() == pytest.approx(-math.log(1e-6), rel=1e-4)  # clamped, not inf
    assert loss[0, 4].item() == pytest.approx(math.log(2), rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="clamp"):
        RecheckLoss(clamp=0.0)


def test_embedding_distillation_by_hand() -> None:
    cls = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    nxt = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    # targets f = [[2, 1], [1, 1]]; per sample mean over D: [(1 + 1) / 2, (1 + 1) / 2]
    loss = EmbeddingDistillationLoss()(cls, nxt)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert nxt.grad is None
    torch.testing.assert_close(cls.grad, torch.tensor([[-1.0, 1.0], [-1.0, -1.0]]) / 2)
    per_sample = EmbeddingDistillationLoss(reduction="none")(cls, nxt)
    torch.testing.assert_close(per_sample, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="expected target"):
        EmbeddingDistillationLoss()(cls, nxt[:, 0])


def test_classification_loss() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, -1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    plain = ClassificationLoss()(logits, labels)
    torch.testing.assert_close(plain, F.cross_entropy(logits, labels))
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    balanced = ClassificationLoss(class_balanced=True)(logits, labels)
    # each present class counts equally: mean of the class means
    torch.testing.assert_close(balanced, (per_sample[:3].mean() + per_sample[3]) / 2)
    same = torch.tensor([1, 1, 1, 1])
    one_class = ClassificationLoss(class_balanced=True)(logits, same)
    torch.testing.assert_close(one_class, F.cross_entropy(logits, same))
    weights = ClassificationLoss(class_balanced=True, reduction="none")(logits, labels) / per_sample
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))


def test_reduce_loss_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="Unsupported reduction"):
        reduce_loss(torch.ones(2), "max")


def test_smt_loss_combination() -> None:
    terms = {
        name: torch.tensor(float(v))
        for v, name in enumerate(
            ["cls1", "cls2", "cls3", "emb1", "emb2", "focus1", "focus2", "ret1", "ret2"], start=1
        )
    }
    lam_fwd, lam_bwd = (1.0, 0.5, 0.25), (0.1, 0.2)
    out = SMTLoss()(terms, lam_fwd, lam_bwd)
    l_v = 1 * 1 + 0.5 * 2 + 0.25 * 3 + 0.1 * 4 + 0.2 * 5
    l_f = 0.0 * 1 * 6 + 0.0 * 0.5 * 7 + 0.1 * 8 + 0.2 * 9  # default: no L_focus
    assert out["L_V"].item() == pytest.approx(l_v)
    assert out["L_F"].item() == pytest.approx(l_f)
    assert out["total"].item() == pytest.approx(l_v + l_f)
    assert set(out) == set(terms) | {"L_V", "L_F", "total"}
    paper = SMTLoss(focus_weight=(1.0, 1.0))(terms, lam_fwd, lam_bwd)
    assert paper["L_F"].item() == pytest.approx(l_f + 6 + 0.5 * 7)
    no_ret = SMTLoss(recheck_weight=0.0)(terms, lam_fwd, lam_bwd)
    assert no_ret["L_F"].item() == pytest.approx(l_f - 0.1 * 8 - 0.2 * 9)
    assert no_ret["L_V"].item() == pytest.approx(l_v)
    no_emb = SMTLoss(distillation_weight=0.0)(terms, lam_fwd, lam_bwd)
    assert no_emb["L_V"].item() == pytest.approx(l_v - 0.1 * 4 - 0.2 * 5)
    assert no_emb["L_F"].item() == pytest.approx(l_f)
    annotated = {**terms, "ann1": torch.tensor(10.0), "ann2": torch.tensor(11.0)}
    assert SMTLoss()(annotated, lam_fwd, lam_bwd)["L_F"].item() == pytest.approx(l_f)  # w_ann 0: the paper's
    with_ann = SMTLoss(annotation_weight=2.0)(annotated, lam_fwd, lam_bwd)
    assert with_ann["L_F"].item() == pytest.approx(l_f + 2.0 * (0.1 * 10 + 0.2 * 11))
    assert with_ann["L_V"].item() == pytest.approx(l_v)
    partial = SMTLoss()({"cls1": terms["cls1"], "focus1": terms["focus1"]}, lam_fwd, lam_bwd)
    assert partial["L_V"].item() == pytest.approx(1.0) and partial["L_F"].item() == 0.0
    with pytest.raises(ValueError, match="subset"):
        SMTLoss()({"cls4": terms["cls1"]}, lam_fwd, lam_bwd)
    with pytest.raises(ValueError, match="lambda_fwd"):
        SMTLoss()(terms, lam_fwd[:2], lam_bwd)
    with pytest.raises(ValueError, match="focus_weight"):
        SMTLoss(focus_weight=(1.0,))
    assert isinstance(SMTLoss().classification[1], ClassificationLoss)
    assert [m.class_balanced for m in SMTLoss().classification] == [False, True, True]


def test_cox_partial_likelihood_by_hand() -> None:
    """Slides 1 and 3 die at t = 1 and 3, slide 2 is censored at 2: slide 1's risk set is all three, slide 3's
    itself alone; tied times share a risk set (Breslow); no event, no information (0)."""
    risk = torch.tensor([0.5, -0.2, 1.0], requires_grad=True)
    time, event = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1])
    loss = cox_partial_likelihood(risk, time, event)
    expected = -((0.5 - math.log(math.exp(0.5) + math.exp(-0.2) + math.exp(1.0))) + 0.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert risk.grad[0] < 0  # raising the risk of the first death lowers the loss
    assert risk.grad[1] > 0  # the censored slide only ever sits in risk sets
    tied = cox_partial_likelihood(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([1, 1]))
    assert tied.item() == pytest.approx(math.log(1 + math.e) - 0.5, rel=1e-6)
    none = torch.tensor([0.3, 0.1], requires_grad=True)
    silent = cox_partial_likelihood(none, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    silent.backward()
    assert silent.item() == 0.0 and torch.equal(none.grad, torch.zeros(2))
