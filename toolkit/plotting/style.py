"""One look for every figure of the course: legible when saved, lines told apart in grey.

:data:`COURSE_STYLE` sets matplotlib's figure and savefig resolution to 150 dpi and font
sizes at which subscripts such as ``S_{a+-}`` stay readable in a saved PNG;
:func:`use_course_style` applies it (the notebooks call it in their first cell, after
``%matplotlib inline``, which would otherwise reset the resolution).
"""
from __future__ import annotations

import matplotlib

__all__ = ["COURSE_STYLE", "use_course_style"]

#: rcParams of the course's figures.
COURSE_STYLE = {
    "figure.dpi": 150,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "lines.linewidth": 1.6,
    "lines.markersize": 6,
    "mathtext.fontset": "dejavusans",
}


def use_course_style() -> None:
    """Apply :data:`COURSE_STYLE` to matplotlib's global settings."""
    matplotlib.rcParams.update(COURSE_STYLE)
