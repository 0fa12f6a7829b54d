"""Tests of the method registry (toolkit.methods.REGISTRY) and the estimator table
(toolkit.estimators.ESTIMATORS): every method and estimator is declared once, and every
place that lists them reads the declaration.

What must hold:
* every registered method goes through the common checks of tests/test_methods.py and
  makes the explainer its declaration says (class, pattern kind, output);
* every registered method appears in the command line (accepted by ``--method``, named
  in its help), in ``toolkit.compare`` and in the README's method list, with the same
  class, output and patterns;
* the command's older spellings are aliases of the registered names;
* a bad declaration is refused, and a newly registered method is known at once;
* the estimator table covers the toy's estimators, and quality, compare and the figures
  read it.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import test_methods
from toolkit import compare, linear
from toolkit.cli import _method_list, build_parser
from toolkit.estimators import ESTIMATORS, MEASURABLE
from toolkit.methods import OUTPUTS, REGISTRY, Explainer, Gradient, Method, get_method, register

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32, 3)).double().eval()


# ----------------------------------------------------------------------------------
# the methods
# ----------------------------------------------------------------------------------
def test_the_paper_methods_are_registered_in_the_papers_order():
    assert list(REGISTRY) == ["gradient", "deconvnet", "guided_backprop", "patternnet_linear", "patternnet",
                              "patternattribution_linear", "patternattribution", "lrp_z"]


def test_the_common_checks_cover_every_registered_method():
    assert test_methods.ALL_METHODS == list(REGISTRY)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_method_makes_what_it_declares(name, net):
    method = REGISTRY[name]
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    patterns = test_methods.patterns_like(net, x) if method.needs_patterns else None
    explainer = method.make(net, patterns)
    assert type(explainer) is method.explainer and issubclass(method.explainer, Explainer)
    assert method.output in OUTPUTS
    if method.needs_patterns:
        kind = method.options.get("kind", "two_component")
        assert explainer.kind == kind
        assert method.patterns == (("linear",) if kind == "linear" else ("positive",))
        with pytest.raises(ValueError, match="patterns"):
            method.make(net, None)
    result = explainer.attribute(x)
    assert result.shape == x.shape and torch.isfinite(result).all()


def test_aliases_and_lookup():
    assert get_method("guidedbackprop") is REGISTRY["guided_backprop"]
    assert get_method("LRPZ") is REGISTRY["lrp_z"] and get_method(" lrp_z ") is REGISTRY["lrp_z"]
    with pytest.raises(ValueError, match="unknown method 'saliency'; choose from gradient, deconvnet"):
        get_method("saliency")


def test_bad_declarations_are_refused_and_new_methods_are_known_at_once(net):
    with pytest.raises(ValueError, match="registered already"):
        register(Method("gradient", "Gradient", "Gradient", "signal"))(Gradient)
    with pytest.raises(ValueError, match="registered already"):
        register(Method("my_method", "Mine", "Mine", "signal", aliases=("lrpz",)))(Gradient)
    with pytest.raises(ValueError, match="output must be one of"):
        register(Method("my_method", "Mine", "Mine", "heatmap"))(Gradient)
    with pytest.raises(ValueError, match="unknown pattern kinds"):
        register(Method("my_method", "Mine", "Mine", "signal", patterns=("a_plus",)))(Gradient)
    assert "my_method" not in REGISTRY

    @register(Method("gradient_x2", "Gradient x 2", "Gradient x 2", "signal"))
    class Doubled(Explainer):
        def finish(self, inputs, grad):
            return 2 * grad

    try:
        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        made = compare.make_explainers(net, None, ("gradient", "gradient_x2"))
        torch.testing.assert_close(made["gradient_x2"].attribute(x), 2 * made["gradient"].attribute(x),
                                   rtol=0, atol=0)
        assert _method_list(["gradient_x2"]) == ["gradient_x2"]
    finally:
        del REGISTRY["gradient_x2"]


# ----------------------------------------------------------------------------------
# where the methods are listed
# ----------------------------------------------------------------------------------
def _help(command: str) -> str:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return " ".join(commands.choices[command].format_help().split())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_is_in_the_command_line(name):
    assert _method_list([name]) == [name]
    assert _method_list([name.upper()]) == [name]
    for command in ("explain", "perturbation"):
        assert re.search(rf"\b{name}\b", _help(command)), (command, name)


def test_the_commands_old_spellings_stay_as_aliases():
    assert _method_list(["guidedbackprop,lrpz", "gradient"]) == ["guidedbackprop", "lrpz", "gradient"]
    text = _help("explain")
    assert "guidedbackprop for guided_backprop" in text and "lrpz for lrp_z" in text
    assert _method_list(["random"], extra=("random",)) == ["random"]


def test_every_method_is_in_compare():
    assert compare.METHODS == tuple(REGISTRY)
    for table in (compare.TITLES, compare.LABELS, compare.OUTPUTS):
        assert list(table) == list(REGISTRY)
    assert compare.OUTPUTS == {name: m.output for name, m in REGISTRY.items()}
    assert compare.PATTERN_METHODS == tuple(n for n, m in REGISTRY.items() if m.needs_patterns)


def _readme_methods() -> dict[str, list[str]]:
    """``{name: [class, output, patterns]}`` from the table of the README's Methods section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0]] = cells[1:]
    return rows


def test_every_method_is_in_the_readme():
    rows = _readme_methods()
    assert list(rows) == list(REGISTRY)
    for name, (cls, output, patterns) in rows.items():
        method = REGISTRY[name]
        assert cls.split("(")[0] == method.explainer.__name__
        assert ('kind="linear"' in cls) == (method.options.get("kind") == "linear")
        assert output == method.output
        assert patterns == (", ".join(method.patterns) or "-")
    text = README.read_text(encoding="utf-8")
    assert all(f"`{alias}`" in text for m in REGISTRY.values() for alias in m.aliases)


# ----------------------------------------------------------------------------------
# the estimators
# ----------------------------------------------------------------------------------
def test_the_estimator_table_covers_the_toys_estimators():
    assert set(ESTIMATORS) == set(linear.ESTIMATORS)
    assert MEASURABLE == ("random", "filter", "linear", "two_component")
    assert {e.symbol for e in ESTIMATORS.values()} == {c.symbol for c in linear.ESTIMATORS.values()}
    for e in ESTIMATORS.values():
        if e.pattern == "fitted":
            assert e.pattern_kinds and e.kind == ("linear" if e.pattern_kinds == ("linear",) else "two_component")
        if e.attribution in REGISTRY:
            assert REGISTRY[e.attribution].output == "attribution"


def test_quality_compare_and_figures_read_the_estimator_table():
    import inspect

    from toolkit.plotting import evaluation, images, toy
    from toolkit.quality import layer_quality
    from toolkit.widgets import _PLAIN_NAMES

    assert inspect.signature(layer_quality).parameters["estimators"].default == MEASURABLE
    assert compare.ESTIMATOR_METHODS == {n: e.attribution for n, e in ESTIMATORS.items() if e.attribution}
    assert list(compare.ESTIMATOR_NAMES) == ["identity", "filter", "linear", "two_component"]
    assert evaluation.QUALITY_LABELS == {n: ESTIMATORS[n].legend for n in MEASURABLE}
    assert list(evaluation.ESTIMATOR_CURVES) == [*compare.ESTIMATOR_METHODS.values(), "random"]
    assert toy.ESTIMATOR_LABELS["two_component"] == r"two-component $S_{a\pm}$"
    assert _PLAIN_NAMES["two_component"] == "two-component S_a+-"
    assert images.OUTPUTS == OUTPUTS


def test_building_the_command_line_reads_the_registry_only_for_its_help():
    """The method names reach the help when it is shown: ``toolkit --help`` and building
    the parser import no torch (seconds on a busy machine)."""
    import os
    import subprocess
    import sys

    code = "import sys; from toolkit.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(README.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
