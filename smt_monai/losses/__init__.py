"""SMT losses: Eq. 1 (classification), 3 (focus), 4 (recheck), 5-6 (embedding distillation), 7 (combined), and
the Cox partial likelihood of the optional risk head (prognosis)."""

from smt_monai.losses.classification import ClassificationLoss
from smt_monai.losses.combined import TERMS, SMTLoss
from smt_monai.losses.distillation import EmbeddingDistillationLoss
from smt_monai.losses.focus import FocusLoss
from smt_monai.losses.recheck import RecheckLoss
from smt_monai.losses.survival import cox_partial_likelihood

__all__ = [
    "TERMS",
    "ClassificationLoss",
    "EmbeddingDistillationLoss",
    "FocusLoss",
    "RecheckLoss",
    "SMTLoss",
    "cox_partial_likelihood",
]
