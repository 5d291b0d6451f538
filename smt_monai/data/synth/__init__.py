"""Synthetic whole-slide cohort: the benchmark SMT is made for, since no public slide set can be downloaded.

Slides have tissue sections on glass (biopsy- to resection-sized, in mm) and, in them, a few suspicious
regions (0.1 to 0.6 mm in radius) that stand out at low magnification (denser, darker, more purple than the
stroma). Benign mimics (lymphoid clusters) occur in positive and negative slides alike and, once
area-averaged to 4 um/px or coarser, look the same as tumour; only at full resolution (0.25 or 0.5 um/px)
do the nuclei tell them apart. A first SMT layer can therefore find where to look but not decide; the last
layer must. The specimen is described in micrometres and rendered at any mpp; pen marks and debris on the
glass, never annotated, can be added to test tissue detection. A cohort is made for diagnosis (is there
tumour) or for grading (benign, or the grade of the worst tumour region, which shows as the share of
atypical nuclei at full resolution only). See :mod:`.render` for how tumour and mimic, and any mix of them,
are made alike at low magnification, :mod:`.scene` for the layout and the labels, :mod:`.pyramid` for the
file format and :mod:`.cohort` for the files written.
"""

from smt_monai.data.synth.cohort import (
    FOLLOW_UP_MONTHS,
    SYNTH_HELP,
    SlideOptions,
    add_synth_arguments,
    label_names,
    main,
    make_cohort,
    make_slide,
    run_synth,
    slide_seed,
    stratified_split,
    synthetic_survival,
)
from smt_monai.data.synth.render import Appearance, TileRenderer
from smt_monai.data.synth.scene import MIMIC, TUMOUR, LayoutOptions, PenStroke, Scene, Speck, make_scene

__all__ = [
    "FOLLOW_UP_MONTHS",
    "MIMIC",
    "SYNTH_HELP",
    "TUMOUR",
    "Appearance",
    "LayoutOptions",
    "PenStroke",
    "Scene",
    "SlideOptions",
    "Speck",
    "TileRenderer",
    "add_synth_arguments",
    "label_names",
    "main",
    "make_cohort",
    "make_scene",
    "make_slide",
    "run_synth",
    "slide_seed",
    "stratified_split",
    "synthetic_survival",
]
