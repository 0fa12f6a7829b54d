"""Relevance across residual blocks: what the toolkit's rule at an addition does.

docs/math.md, section 6.1, states the rule the toolkit applies at an addition ``u = z + s``
(the backward signal passes unchanged to both summands) and what deep Taylor
decomposition asks for instead (a split of the relevance of ``u`` that adds up to it).
What must hold (float64, a small ``SmallResNet`` with BatchNorm far from the identity):

* ``toolkit.PatternAttribution`` equals PatternAttribution written out as one linear map
  with the rule "unchanged to both summands" (``scripts/measure_addition_rules.py``, the
  measurement behind section 6.1), and with it the relevance leaving every addition is
  exactly twice the relevance entering it;
* the split with the addition's own pattern (``a_z + a_s = 1``) conserves it exactly;
* LRP-z (input times gradient) conserves it at the addition, and across a whole block
  when no bias takes a share;
* ``toolkit.conservation.block_relevance`` gives the sums of that reference and of plain
  autograd at the block's output and input.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from toolkit.conservation import block_relevance
from toolkit.layers import trace
from toolkit.methods import LRPZ, PatternAttribution
from toolkit.models import SmallResNet
from toolkit.patterns import fit_patterns

BLOCKS = ["layer1", "layer2", "layer3"]


def _script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "measure_addition_rules.py"
    spec = importlib.util.spec_from_file_location("measure_addition_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resnet(biases: bool) -> SmallResNet:
    torch.manual_seed(0)
    net = SmallResNet(width=4)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.3, 3.0)
                module.weight.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.3, 0.3) if biases else module.running_mean.zero_()
                module.bias.uniform_(-0.2, 0.2) if biases else module.bias.zero_()
        if not biases:
            net.fc.bias.zero_()
    return net.double().eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def setting():
    net = _resnet(biases=True)
    with warnings.catch_warnings():  # some classes of the random network are never predicted
        warnings.simplefilter("ignore", UserWarning)
        patterns = fit_patterns(net, _images(60, 1).split(20), progress=False)
    layers = {layer.name: layer for layer in trace(net, _images(1, 2))}
    return net, patterns, layers, _images(6, 3)


def test_patternattribution_passes_the_signal_unchanged_and_doubles_relevance(setting):
    net, patterns, layers, images = setting
    script = _script()
    target = net(images).argmax(1)
    reference = script.LinearisedPatternAttribution(layers, patterns, "adjoint")
    expected = reference.attribute(images, target)
    got = PatternAttribution(net, patterns).attribute(images, target)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for block, (entering, leaving, _) in reference.flow.items():
        torch.testing.assert_close(leaving, 2 * entering, rtol=1e-12, atol=1e-12)


def test_the_split_with_the_addition_pattern_conserves(setting):
    net, patterns, layers, images = setting
    script = _script()
    shares = script.addition_patterns(layers, _images(60, 1))
    for a_z, a_s in shares.values():
        torch.testing.assert_close(a_z + a_s, torch.ones_like(a_z), rtol=0, atol=1e-12)
    for rule in ("pattern", "z"):
        reference = script.LinearisedPatternAttribution(layers, patterns, rule, shares)
        reference.attribute(images, net(images).argmax(1))
        for block, (entering, leaving, _) in reference.flow.items():
            torch.testing.assert_close(leaving, entering, rtol=1e-10, atol=1e-12)


def test_block_relevance_equals_the_reference(setting):
    net, patterns, layers, images = setting
    reference = _script().LinearisedPatternAttribution(layers, patterns, "adjoint")
    target = net(images).argmax(1)
    reference.attribute(images, target)
    flow = block_relevance(PatternAttribution(net, patterns), images, BLOCKS, target)
    for block in BLOCKS:
        at_addition, _, leaving = reference.flow[block]
        torch.testing.assert_close(flow[block].addition_ratio, leaving / at_addition, rtol=1e-10, atol=1e-12)
        assert (flow[block].addition_ratio > 1).all()  # the shortcut returns all of it, the branch more


def test_lrpz_is_input_times_gradient_at_the_blocks_and_conserves_without_biases():
    for biases in (True, False):
        net = _resnet(biases)
        images = _images(5, 4)
        target = net(images).argmax(1)
        flow = block_relevance(LRPZ(net), images, BLOCKS, target)
        kept = {}

        def keep(name):
            def hook(module, args, output):
                kept[name] = (args[0], output)
                args[0].retain_grad()
                output.retain_grad()
            return hook

        hooks = [getattr(net, b).register_forward_hook(keep(b)) for b in BLOCKS]
        x = images.clone().requires_grad_(True)
        logits = net(x)
        for hook in hooks:
            hook.remove()
        logits.gather(1, target[:, None]).sum().backward()
        for b in BLOCKS:
            block_input, block_output = kept[b]
            leaving = (block_input * block_input.grad).flatten(1).sum(1)
            entering = (block_output * block_output.grad).flatten(1).sum(1)
            torch.testing.assert_close(flow[b].ratio, (leaving / entering).detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(flow[b].at_addition, flow[b].entering, rtol=1e-12, atol=1e-12)
            if not biases:
                torch.testing.assert_close(flow[b].ratio, torch.ones_like(flow[b].ratio), rtol=1e-10, atol=0)
        if biases:
            assert not torch.allclose(flow["layer2"].ratio, torch.ones(5, dtype=torch.float64), rtol=1e-3)


def test_block_relevance_refuses_what_is_not_a_block(setting):
    net, patterns, _, images = setting
    with pytest.raises(ValueError, match="not residual blocks"):
        block_relevance(LRPZ(net), images, ["conv1"])
