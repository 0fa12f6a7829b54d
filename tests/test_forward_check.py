"""The code between the modules (toolkit.layers.check_forward), in the API and the CLI.

What must hold:
* a functional ``torch.sigmoid``, a product with a tensor, an offset, dropout in
  training mode and torchvision's ``resnet18`` (residual additions) are refused by
  ``fit_patterns`` and by every explainer's ``attribute``, with messages that name the
  operation, the module whose forward holds it and the source line; and by
  ``toolkit fit`` / ``toolkit explain`` as one line, exit status 2;
* what the allow-list admits (views, shape arithmetic, functional ReLU and pooling,
  dropout in eval mode, scaling by a Python number) works, and the gradient through it
  equals autograd's; DeconvNet and Guided Backprop refuse a functional ReLU, because
  their ReLU rule is applied at ``nn.ReLU`` modules;
* a forward torch.fx cannot trace gets an UnverifiedForwardWarning that says what was
  not checked; the supported models (torchvision VGG/AlexNet, toolkit.models,
  toolkit.experiment) are traced and pass without a warning.
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


RESNET = (r"operation 'operator\.add' at node 'add' in the forward of module 'layer1\.0' \(BasicBlock\), "
          r"resnet\.py line \d+: 'out \+= identity' is not supported: a residual connection.*"
          r"residual networks are not supported yet")


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


def test_resnet18_is_refused_as_a_residual_network():
    model = resnet18()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(UnsupportedLayerError, match=RESNET):
        fit_patterns(model, [x], progress=False)
    for cls in (Gradient, PatternNet):
        with pytest.raises(UnsupportedLayerError, match=RESNET):
            make(cls, model).attribute(x)


def test_the_allowed_operations_work_and_give_the_gradient():
    torch.manual_seed(0)
    model = FunctionalNet().double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    plan = trace(model, x)
    assert plan.names == ["block.conv", "fc"] and plan.forward_verified
    assert len(plan.relu_calls) == 1 and "module 'block' (Block)" in plan.relu_calls[0]
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(xg)[:, 4].sum(), xg)
    torch.testing.assert_close(Gradient(model).attribute(x, 4), expected, rtol=1e-12, atol=1e-14)
    # fitting works too (fit_patterns traces the same way)
    patterns = fit_patterns(model, [x], progress=False)
    assert patterns.names == ["block.conv", "fc"]


@pytest.mark.parametrize("cls", [DeconvNet, GuidedBackprop], ids=lambda c: c.__name__)
def test_functional_relu_is_refused_by_the_relu_rule_methods(cls):
    model = FunctionalNet().eval()
    with pytest.raises(UnsupportedLayerError, match=f"{cls.__name__} applies its ReLU rule at nn.ReLU "
                                                    r"modules.*module 'block' \(Block\).*nn\.ReLU module"):
        cls(model).attribute(torch.randn(2, 2, 8, 8))


def test_untraceable_forward_warns_what_was_not_verified():
    torch.manual_seed(0)
    model = BranchingNet().eval()
    x = torch.randn(2, 6)
    with pytest.warns(UnverifiedForwardWarning, match="cannot trace the forward of BranchingNet.*only its "
                                                      "modules were checked.*not verified"):
        result = Gradient(model).attribute(x, 1)
    assert torch.isfinite(result).all()
    with pytest.warns(UnverifiedForwardWarning):
        verified, _ = check_forward(model, x)
    assert not verified


def test_residual_addition_is_refused_in_one_place():
    """The allow-list names additions as one category, judged by one function."""
    from toolkit import layers

    assert {k for k, v in ALLOWED_OPERATIONS.items() if v == "addition"} >= {"add", "iadd", "add_"}
    assert "residual networks are not supported yet" in layers._refuse_residual_addition(
        None, (torch.ones(1), torch.ones(1)), {})


@pytest.mark.parametrize("name", ["vgg11_bn", "alexnet"])
def test_supported_torchvision_models_pass_without_warning(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = trace(model, torch.randn(1, 3, 64, 64))
    assert plan.forward_verified and not plan.relu_calls


def test_toolkit_models_pass_without_warning():
    from toolkit.experiment import MiniVGG16
    from toolkit.models import SmallVGG

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


def test_cli_fit_refuses_resnet18(image_data, tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "p.safetensors"
    assert main(["fit", "--model", "torchvision.models:resnet18", "--data", str(image_data), "--out", str(out),
                 "--workers", "0", "--quiet"]) == 2
    err = _one_line_error(capsys, "fit")
    assert "'operator.add'" in err and "residual networks are not supported yet" in err
    assert not out.exists()


@pytest.mark.parametrize("factory", ["SigmoidNet", "GateNet"])
def test_cli_fit_and_explain_refuse_forward_code(factory, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32))
    spec = f"{__name__}:{factory}"
    assert main(["fit", "--model", spec, "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "p.safetensors"),
                 "--workers", "0", "--quiet"]) == 2
    operation = {"SigmoidNet": "'torch.sigmoid'", "GateNet": "'operator.mul'"}[factory]
    err = _one_line_error(capsys, "fit")
    assert operation in err and f"{factory}.forward" in err


def test_cli_explain_refuses_resnet18(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img.png")
    assert main(["explain", "--model", "torchvision.models:resnet18", "--method", "gradient", "--resize", "32",
                 "--crop", "32", str(tmp_path / "img.png"), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, "explain")
    assert "'operator.add'" in err and "residual networks are not supported yet" in err
