"""The code between the modules (toolkit.layers.check_forward), in the API and the CLI.

What must hold:
* a functional ``torch.sigmoid``, a product with a tensor, an offset, dropout in
  training mode and a broadcasting sum are refused by
  ``fit_patterns`` and by every explainer's ``attribute``, with messages that name the
  operation, the module whose forward holds it and the source line; and by
  ``toolkit fit`` / ``toolkit explain`` as one line, exit status 2;
* what the allow-list admits (views, shape arithmetic, functional ReLU and pooling,
  dropout in eval mode, scaling by a Python number) works, and the gradient through it
  equals autograd's; every method treats a functional ReLU as an ``nn.ReLU`` module;
* a forward torch.fx cannot trace gets an UnverifiedForwardWarning that says what was
  not checked; the supported models (torchvision VGG/AlexNet, toolkit.models' SmallVGG
  and MiniVGG16) are traced and pass without a warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from toolkit.cli import main
from toolkit.layers import (ALLOWED_OPERATIONS, UnsupportedLayerError, UnverifiedForwardWarning,
                            check_forward, trace)
from toolkit.methods import (LRPZ, DeconvNet, Gradient, GuidedBackprop, PatternAttribution,
                             PatternNet)
from toolkit.patterns import LayerPatterns, Patterns, fingerprint, fit_patterns

METHODS = (Gradient, DeconvNet, GuidedBackprop, PatternNet, PatternAttribution, LRPZ)


class SigmoidNet(nn.Module):
    """Linear - torch.sigmoid (a function, invisible to module hooks) - Linear."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.second(torch.sigmoid(self.first(x)))


class GateNet(nn.Module):
    """Linear - times a learned tensor - Linear."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 3)
        self.gate = nn.Parameter(torch.linspace(-1, 1, 8))

    def forward(self, x):
        return self.second(self.first(x) * self.gate)


class OffsetNet(SigmoidNet):
    def forward(self, x):
        return self.second(self.first(x) + 1.0)


class TrainingDropoutNet(SigmoidNet):
    def forward(self, x):
        return self.second(F.dropout(self.first(x), 0.5))  # training=True by default


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)


class FunctionalNet(nn.Module):
    """Everything on the allow-list, written as functions and tensor methods."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        x = self.block(x * 0.5)
        x = F.dropout(x, 0.3, training=self.training)
        x = x.view(x.size(0), -1) / 2
        return self.fc(-x)


class BranchingNet(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.first(x)
        if h.sum() > -1e9:
            h = torch.relu(h)
        return self.second(h)


def weight_patterns(model: nn.Module) -> Patterns:
    """Patterns equal to the weights, built without tracing (the model may be refused)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach().double()
            layers[name] = LayerPatterns(w, w, w)
    return Patterns(layers, fingerprint(model))


def make(cls, model):
    return cls(model, weight_patterns(model)) if cls in (PatternNet, PatternAttribution) else cls(model)


REFUSED = [
    (SigmoidNet, (4, 6), r"operation 'torch\.sigmoid' at node 'sigmoid' in SigmoidNet\.forward, "
                         r"test_forward_check\.py line \d+: 'return self\.second\(torch\.sigmoid"),
    (GateNet, (4, 6), r"operation 'operator\.mul' .*GateNet\.forward.*self\.first\(x\) \* self\.gate.*"
                      r"product or quotient with a tensor"),
    (OffsetNet, (4, 6), r"operation 'operator\.add' .*an offset"),
    (TrainingDropoutNet, (4, 6), r"operation 'torch\.nn\.functional\.dropout' .*training=True"),
]


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.mark.parametrize("factory, shape, message", REFUSED, ids=lambda v: getattr(v, "__name__", None))
def test_refused_in_fit_patterns(factory, shape, message):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match=message):
        fit_patterns(factory(), [torch.randn(*shape)], progress=False)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("factory, shape, message", REFUSED, ids=lambda v: getattr(v, "__name__", None))
def test_refused_in_attribute(factory, shape, message, cls):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match=message):
        make(cls, factory()).attribute(torch.randn(*shape))


def test_resnet18_cuts_are_the_block_outputs():
    """Residual additions of two same-shaped tensors are allowed; the graph knows where
    every path from the input to the output passes (where the methods may rescale their
    signal): the stem's layers and the output of every block, not the layers inside a block."""
    model = resnet18()
    plan = trace(model, torch.randn(2, 3, 32, 32))
    assert plan.is_cut(plan["conv1"]) and plan.is_cut(plan["fc"])
    inside = [name for name in plan.names if name.startswith("layer")]
    assert inside and not any(plan.is_cut(plan[name]) for name in inside)
    nodes, cuts = plan.graph.nodes, plan.graph.cuts
    block_outputs = [n for n in cuts if n in plan.graph.activations and nodes[n].target.endswith("relu")
                     and nodes[n].target.startswith("layer")]
    assert len(block_outputs) == 8  # the ReLU after the addition of each of the 8 blocks


class BroadcastSumNet(nn.Module):
    """Adds a (N, 1) tensor to a (N, 6) one: broadcasting, not a residual connection."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.first(x) + self.second(x)


def test_a_broadcasting_sum_is_refused():
    with pytest.raises(UnsupportedLayerError, match=r"operator\.add.*different shapes"):
        fit_patterns(BroadcastSumNet(), [torch.randn(4, 6)], progress=False)


def test_the_allowed_operations_work_and_give_the_gradient():
    torch.manual_seed(0)
    model = FunctionalNet().double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    plan = trace(model, x)
    assert plan.names == ["block.conv", "fc"] and plan.forward_verified
    assert len(plan.graph.activations) == 1  # the functional ReLU of Block
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(xg)[:, 4].sum(), xg)
    torch.testing.assert_close(Gradient(model).attribute(x, 4), expected, rtol=1e-12, atol=1e-14)
    # fitting works too (fit_patterns traces the same way)
    patterns = fit_patterns(model, [x], progress=False)
    assert patterns.names == ["block.conv", "fc"]


class ModuleBlock(nn.Module):
    """Block written with an nn.ReLU module and nn.MaxPool2d instead of functions."""

    def __init__(self, conv):
        super().__init__()
        self.conv, self.relu, self.pool = conv, nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.relu(self.conv(x)))


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_functional_relu_gets_the_rule_of_a_relu_module(cls):
    """Every method, DeconvNet and Guided Backprop included, treats F.relu as nn.ReLU:
    the network written with modules gives the same explanation."""
    torch.manual_seed(0)
    functional = FunctionalNet().double().eval()
    modules = copy_with_module_block(functional)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    expected = make(cls, modules).attribute(x, 2)
    explainer = make(cls, functional)
    if isinstance(explainer, (PatternNet, PatternAttribution)):
        explainer = cls(functional, weight_patterns(functional))
    torch.testing.assert_close(explainer.attribute(x, 2), expected, rtol=1e-12, atol=1e-14)


def copy_with_module_block(net: "FunctionalNet") -> nn.Module:
    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.fc = ModuleBlock(net.block.conv), net.fc

        def forward(self, x):
            x = self.block(x * 0.5)
            return self.fc(-(x.flatten(1) / 2))

    return Twin().eval()


def test_untraceable_forward_warns_what_was_not_verified():
    torch.manual_seed(0)
    model = BranchingNet().eval()
    x = torch.randn(2, 6)
    with pytest.warns(UnverifiedForwardWarning, match="cannot trace the forward of BranchingNet.*only its "
                                                      "modules were checked.*not verified"):
        result = Gradient(model).attribute(x, 1)
    assert torch.isfinite(result).all()
    with pytest.warns(UnverifiedForwardWarning):
        verified = check_forward(model, x)
    assert verified is False
    assert check_forward(FunctionalNet().eval(), torch.randn(2, 2, 8, 8)) is True


def test_additions_are_judged_in_one_place():
    """The allow-list names additions as one category, judged by one function: two
    same-shaped tensors are a residual connection (allowed), anything else is not."""
    from toolkit.layers.operations import judge_addition as judge

    assert {k for k, v in ALLOWED_OPERATIONS.items() if v == "addition"} >= {"add", "iadd", "add_"}
    assert judge((torch.ones(2, 3), torch.ones(2, 3)), {}, [True, True]) is None
    assert "different shapes" in judge((torch.ones(2, 3), torch.ones(2, 1)), {}, [True, True])
    assert "offset" in judge((torch.ones(2, 3), 1.0), {}, [True])
    assert "offset" in judge((torch.ones(2, 3), torch.ones(2, 3)), {}, [True, False])
    assert "offset" in judge((torch.ones(2, 3), torch.ones(1, 3)), {}, [True, False])   # a bias


@pytest.mark.parametrize("name", ["vgg11_bn", "alexnet"])
def test_supported_torchvision_models_pass_without_warning(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = trace(model, torch.randn(1, 3, 64, 64))
    assert plan.forward_verified and not any(a.passes_inactive for a in plan.activities.values())


def test_toolkit_models_pass_without_warning():
    from toolkit.models import MiniVGG16, SmallVGG

    for model, shape in [(SmallVGG(in_channels=1, image_size=8, width=2, hidden=4), (1, 1, 8, 8)),
                         (MiniVGG16(), None)]:
        if shape is None:
            shape = (1, 3, 32, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plan = trace(model.eval(), torch.randn(*shape))
        assert plan.forward_verified


# ----------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------
def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"toolkit {command}: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture
def image_data(tmp_path) -> Path:
    path = tmp_path / "images.npz"
    np.savez(path, images=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    return path


def test_cli_fit_takes_resnet18(image_data, tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "p.safetensors"
    assert main(["fit", "--model", "torchvision.models:resnet18", "--weights", "random", "--data",
                 str(image_data), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert out.exists()


@pytest.mark.parametrize("factory", ["SigmoidNet", "GateNet"])
def test_cli_fit_and_explain_refuse_forward_code(factory, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32))
    spec = f"{__name__}:{factory}"
    assert main(["fit", "--model", spec, "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "p.safetensors"),
                 "--workers", "0", "--quiet"]) == 2
    operation = {"SigmoidNet": "'torch.sigmoid'", "GateNet": "'operator.mul'"}[factory]
    err = _one_line_error(capsys, "fit")
    assert operation in err and f"{factory}.forward" in err


