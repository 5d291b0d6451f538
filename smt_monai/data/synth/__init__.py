"""Synthetic whole-slide cohort: the benchmark SMT is made for, since no public slide set can be downloaded.

Slides have tissue pieces on glass and, in each, a few suspicious regions that stand out at low
magnification (denser, darker, more purple than the stroma). Benign mimics (lymphoid clusters) occur in
positive and negative slides alike and, once area-averaged to downsample 16 or more, look the same as
tumour; only at level 0 do the nuclei tell them apart. A first SMT layer can therefore find where to look
but not decide; the last layer must. See :mod:`.render` for how the two are made alike at low magnification,
:mod:`.scene` for the layout, :mod:`.pyramid` for the file format and :mod:`.cohort` for the files written.
"""

from smt_monai.data.synth.cohort import (
    SYNTH_HELP,
    SlideOptions,
    add_synth_arguments,
    main,
    make_cohort,
    make_slide,
    run_synth,
    slide_seed,
    stratified_split,
)
from smt_monai.data.synth.render import Appearance, TileRenderer
from smt_monai.data.synth.scene import MIMIC, TUMOUR, LayoutOptions, Scene, make_scene

__all__ = [
    "MIMIC",
    "SYNTH_HELP",
    "TUMOUR",
    "Appearance",
    "LayoutOptions",
    "Scene",
    "SlideOptions",
    "TileRenderer",
    "add_synth_arguments",
    "main",
    "make_cohort",
    "make_scene",
    "make_slide",
    "run_synth",
    "slide_seed",
    "stratified_split",
]
