"""An interactive explorer of the 2-D signal/distractor toy (ipywidgets).

Move the signal and distractor directions, the noise and the number of samples, and
watch the filter ``w`` turn with the distractor while the learned patterns stay on the
signal; a table lists ``w``, every estimator's pattern(s) and ``rho(S)``.

All numbers come from the pure function :func:`toolkit.linear.explore`; the panel is
drawn by :func:`toolkit.plotting.toy.plot_exploration` into a PNG with matplotlib's Agg
renderer, so the explorer needs no interactive matplotlib backend. ipywidgets (and so
IPython) is imported only inside :func:`explorer`: this module, like the rest of the
toolkit, imports on a machine without Jupyter.

Examples
--------
In a notebook::

    from toolkit.widgets import explorer
    explorer()
"""
from __future__ import annotations

import html
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from toolkit import estimators
from toolkit.linear import ESTIMATORS, explore
from toolkit.plotting.toy import plot_exploration

__all__ = ["explorer", "PanelRenderer", "summary_table_html", "FIGURE2_ANGLES", "INVALID_CLASS"]

#: The distractor angles of the paper's Figure 2 (signal at 0 degrees), one button each.
FIGURE2_ANGLES = (90, 45, 135, 30)
#: CSS class the figure and the table carry while the setting is invalid.
INVALID_CLASS = "explorer-invalid"

# "two-component S_a+-" etc., plain text for the table and the dropdown
_PLAIN_NAMES = {name: estimators.ESTIMATORS[name].title for name in ESTIMATORS}


class PanelRenderer:
    """Draw explorer panels into PNG bytes quickly, reusing one figure.

    A full matplotlib draw of the panel (frame, ticks, labels) takes tens of
    milliseconds; most of it does not change when a slider moves. So the renderer
    keeps a snapshot of the static part (*blitting*) and per update draws only the
    artists of :func:`~toolkit.plotting.toy.plot_exploration` (samples, arrows, titles)
    onto it. The window is rounded up to half units, so the snapshot is redrawn only
    when the data outgrow it. The legend lives outside the image, in the widget.

    Parameters
    ----------
    figsize : tuple of float
        Size of the panel in inches.
    dpi : int
        Resolution of the image.
    max_points : int
        At most this many samples are drawn.
    """

    def __init__(self, figsize=(5.2, 5.2), dpi=80, max_points=400):
        self.figure = Figure(figsize=figsize, dpi=dpi)
        self.figure.subplots_adjust(left=0.13, right=0.97, bottom=0.1, top=0.93)
        self.canvas = FigureCanvasAgg(self.figure)
        self.axes = self.figure.add_subplot()
        self.max_points = max_points
        self._background = None
        self._window = None

    def render(self, exploration):
        """Redraw the panel for ``exploration`` and return it as PNG bytes."""
        ax = self.axes
        for artist in [*ax.collections, *ax.texts, *ax.lines, *ax.patches]:
            artist.remove()
        plot_exploration(ax, exploration, legend=False, max_points=self.max_points)
        moving = sorted([*ax.collections, *ax.texts, *ax.lines, *ax.patches],
                        key=lambda artist: artist.get_zorder())
        for artist in moving:
            artist.set_animated(True)  # left out of the static snapshot

        window = np.ceil(2.0 * ax.get_xlim()[1]) / 2.0
        ax.set_xlim(-window, window)
        ax.set_ylim(-window, window)
        if window != self._window:
            self.canvas.draw()
            self._background = self.canvas.copy_from_bbox(self.figure.bbox)
            self._window = window
        self.canvas.restore_region(self._background)
        for artist in moving:
            ax.draw_artist(artist)

        return self._png()

    def render_invalid(self, message="no filter exists for this setting"):
        """A greyed, empty panel with ``message``, as PNG bytes (for an invalid setting)."""
        self._window = None  # the next valid render redraws the static part
        ax = self.axes
        for artist in [*ax.collections, *ax.texts, *ax.lines, *ax.patches]:
            artist.remove()
        ax.set_title("")
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
                wrap=True, color="0.3")
        self.figure.set_facecolor("0.85")
        ax.set_facecolor("0.85")
        self.canvas.draw()
        png = self._png()
        self.figure.set_facecolor("white")
        ax.set_facecolor("white")
        return png

    def _png(self):
        buffer = io.BytesIO()
        opaque = np.asarray(self.canvas.buffer_rgba())[..., :3]  # the figure has no alpha
        Image.fromarray(opaque).save(buffer, format="png", compress_level=1)
        return buffer.getvalue()


def _number(value, sign=""):
    """Three decimals; rounding first keeps ``-0.000`` out of the table."""
    return f"{np.round(value, 3) + 0.0:{sign}.3f}"


def _vector(v):
    """``(+1.000, -0.500)``."""
    return "(" + ", ".join(_number(value, "+") for value in v) + ")"


def summary_table_html(exploration):
    """HTML table of ``w``, each estimator's pattern(s) and ``rho(S)``.

    The row of the selected estimator is bold; an undefined ``rho`` shows its reason.
    """
    rows = [
        "<tr><td><b>filter w</b></td><td colspan='2'>"
        f"{_vector(exploration.w)}&nbsp;&nbsp;(w&#7488;a_s = "
        f"{_number(exploration.w @ exploration.a_s)}, "
        f"w&#7488;a_d = {_number(exploration.w @ exploration.a_d)})"
        "</td></tr>"
    ]
    for name in ESTIMATORS:
        patterns = exploration.patterns[name]
        shown = "<br>".join(f"{label} = {_vector(vector)}" for label, vector in patterns.items())
        rho = exploration.rho[name]
        rho_text = (f"{rho:.3f}" if rho is not None
                    else f"<span title='{html.escape(exploration.notes[name])}'>undefined "
                         "(distractor has no variance)</span>")
        weight = "bold" if name == exploration.selected else "normal"
        rows.append(
            f"<tr style='font-weight:{weight}'><td>{html.escape(_PLAIN_NAMES[name])}</td>"
            f"<td>{shown or '&ndash; (S(x) = x)'}</td><td>&rho; = {rho_text}</td></tr>"
        )
    header = "<tr><th>estimator</th><th>pattern(s)</th><th>quality (held out)</th></tr>"
    return ("<table style='font-family:monospace; border-collapse:collapse'>"
            + header + "".join(rows) + "</table>")


def _error_html(error):
    return (f"<p style='color:#b00'>Cannot fit this setting: {html.escape(str(error))}</p>"
            "<p style='color:#777'>(no filter, no patterns, no &rho; to show)</p>")


def explorer(signal_angle=0.0, distractor_angle=45.0, noise_mean=0.0, noise_std=1.0, n=1000,
             estimator="two_component", mean_y="masked", seed=0):
    """Build the interactive toy explorer.

    Parameters
    ----------
    signal_angle, distractor_angle, noise_mean, noise_std, n, estimator, mean_y
        Initial values of the controls (see :func:`toolkit.linear.explore`).
    seed : int
        Seed of the samples; fixed, so moving a control changes only what it controls.

    Returns
    -------
    ipywidgets.VBox
        The panel. For scripting and tests it also carries ``controls`` (the control
        widgets by the name of the :func:`~toolkit.linear.explore` argument they set),
        ``buttons`` (one per distractor angle of Figure 2), ``image`` (the figure, an
        ``ipywidgets.Image``) and ``table`` (an ``ipywidgets.HTML``). An invalid setting
        (signal parallel to the distractor) greys the figure, replaces the table by the
        reason and gives both the CSS class :data:`INVALID_CLASS`.
    """
    import ipywidgets as widgets

    wide = {"description_width": "10em"}
    slider = dict(style=wide, layout=widgets.Layout(width="30em"))
    controls = {
        "signal_angle": widgets.FloatSlider(
            value=signal_angle, min=0, max=180, step=1, description="signal angle °", **slider),
        "distractor_angle": widgets.FloatSlider(
            value=distractor_angle, min=0, max=180, step=1, description="distractor angle °",
            **slider),
        "noise_mean": widgets.FloatSlider(
            value=noise_mean, min=-2, max=2, step=0.05, description="noise mean ν", **slider),
        "noise_std": widgets.FloatSlider(
            value=noise_std, min=0, max=2, step=0.05, description="noise std σ", **slider),
        "n": widgets.IntSlider(
            value=n, min=20, max=5000, step=10, description="samples n", continuous_update=False,
            **slider),
        "estimator": widgets.Dropdown(
            options=[(_PLAIN_NAMES[name], name) for name in ESTIMATORS], value=estimator,
            description="estimator", **slider),
        "mean_y": widgets.Dropdown(
            options=[("E+[y] per side (default, seminar)", "masked"),
                     ("E[y] over all samples (authors)", "global")],
            value=mean_y, description="S_a+- uses", **slider),
    }
    image = widgets.Image(format="png", layout=widgets.Layout(width="420px"))
    table = widgets.HTML()
    renderer = PanelRenderer()

    def update(change=None):
        settings = {name: control.value for name, control in controls.items()}
        try:
            result = explore(seed=seed, **settings)
        except ValueError as error:  # e.g. signal parallel to distractor
            image.value = renderer.render_invalid()
            table.value = _error_html(error)
            for widget in (image, table):
                widget.add_class(INVALID_CLASS)
            return
        image.value = renderer.render(result)
        table.value = summary_table_html(result)
        for widget in (image, table):
            widget.remove_class(INVALID_CLASS)

    for control in controls.values():
        control.observe(update, names="value")
    update()

    def figure2(angle):
        def press(button):
            with panel.hold_sync():
                controls["signal_angle"].value = 0.0
                controls["distractor_angle"].value = float(angle)
        return press

    buttons = []
    for angle in FIGURE2_ANGLES:
        button = widgets.Button(description=f"{angle}°", tooltip=f"signal at 0°, distractor at {angle}°",
                                layout=widgets.Layout(width="4.5em"))
        button.on_click(figure2(angle))
        buttons.append(button)

    legend = widgets.HTML(
        "<small>Dots: samples x coloured by y (blue -1, red +1); black dots: the selected "
        "estimator's signal S(x). Arrows: signal a_s (green), distractor a_d (grey), "
        "filter w (red), pattern(s) (purple a / a+, orange a-).</small>",
        layout=widgets.Layout(width="30em"),
    )
    angles = widgets.HBox([widgets.Label("Figure 2 distractor:", layout=widgets.Layout(width="10em")),
                           *buttons])
    panel = widgets.VBox([
        widgets.HBox([widgets.VBox([*controls.values(), angles, legend]), image]),
        table,
    ])
    panel.controls, panel.buttons, panel.image, panel.table = controls, buttons, image, table
    return panel
