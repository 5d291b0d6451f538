"""SMT focusing: Eq. 2 scores, the score bank, top-K selection with next-layer labels, training flips."""

from smt_monai.focus.bank import ScoreBank
from smt_monai.focus.score import (
    FOCUS_SOURCES,
    check_focus_source,
    class_attention,
    focusing_score,
    minmax_normalize,
    positive_mass,
)
from smt_monai.focus.selection import Selection, next_labels, select_regions

__all__ = [
    "FOCUS_SOURCES",
    "ScoreBank",
    "Selection",
    "check_focus_source",
    "class_attention",
    "focusing_score",
    "minmax_normalize",
    "next_labels",
    "positive_mass",
    "select_regions",
]
