"""Issue 19's constructs, each against a reference that does not share the toolkit's code.

* Conv1d against the same network written with Conv2d (1, k) kernels on (N, C, 1, T);
  Conv3d with depth-1 kernels against its Conv2d form: patterns and explanations equal;
* a concatenation of convolutions that read the same input against one convolution with
  the stacked filters: the same patterns per neuron, the same explanations;
* LeakyReLU(0) against ReLU, and ReLU6 on inputs that never reach 6 against ReLU;
* a tiny Inception-, DenseNet-, MobileNetV2- and ShuffleNet-like network (tests/_families.py):
  Gradient equal to autograd, Guided Backprop and DeconvNet equal to Captum's, LRP-z equal
  to input times gradient, PatternNet and PatternAttribution equal to a backward pass written
  out here (the network's own forward, every neuron layer's backward replaced by its
  pattern's with a straight-through sum, the two-sided layers named by hand), and fits
  independent of the batch size and of the number of processes;
* a LeakyReLU network's PatternNet uses a_- on the inactive side (against the same
  straight-through reference).

All in float64, to 1e-6 relative or better.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _distributed import run_workers
from _families import FAMILIES, TWO_SIDED, family, family_images
from toolkit.layers import trace
from toolkit.methods import LRPZ, DeconvNet, Gradient, GuidedBackprop, PatternAttribution, PatternNet
from toolkit.patterns import KINDS, Patterns, fit_patterns

METHODS = (Gradient, DeconvNet, GuidedBackprop, PatternNet, PatternAttribution, LRPZ)


def fit(model, x, **kwargs) -> Patterns:
    return fit_patterns(model, list(torch.split(x, kwargs.pop("batch", 16))), progress=False, **kwargs)


def explain(cls, model, patterns, x, target):
    explainer = cls(model, patterns) if cls in (PatternNet, PatternAttribution) else cls(model)
    return explainer.attribute(x, target)


def active_target(net, x) -> int:
    """The class whose logit is positive on most inputs (its output neuron has a_+)."""
    with torch.no_grad():
        return int((net(x) > 0).sum(0).argmax())


def assert_close(actual, expected, rel=1e-9):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * max(scale, 1e-300))


# ----------------------------------------------------------------------------------
# 1-D and 3-D convolutions against their 2-D forms
# ----------------------------------------------------------------------------------
def conv1d_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(4, 6, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(6, 8, 3, stride=2, dilation=2, padding="valid"), nn.ReLU(),
        nn.Conv1d(8, 8, 4, padding="same", groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 3)).double().eval()


def as_conv2d(net: nn.Sequential) -> nn.Sequential:
    """The same network on (N, C, 1, T): every kernel, stride, padding and pooling 1 x k."""
    layers = []
    for m in net:
        if isinstance(m, nn.Conv1d):
            padding = m.padding if isinstance(m.padding, str) else (0, m.padding[0])
            c = nn.Conv2d(m.in_channels, m.out_channels, (1, m.kernel_size[0]), (1, m.stride[0]),
                          padding, (1, m.dilation[0]), m.groups).double()
            with torch.no_grad():
                c.weight.copy_(m.weight[:, :, None])
                c.bias.copy_(m.bias)
            layers.append(c)
        elif isinstance(m, nn.MaxPool1d):
            layers.append(nn.MaxPool2d((1, m.kernel_size)))
        elif isinstance(m, nn.AdaptiveAvgPool1d):
            layers.append(nn.AdaptiveAvgPool2d(1))
        else:
            layers.append(m)
    return nn.Sequential(*layers).eval()


def test_conv1d_equals_its_conv2d_form():
    net = conv1d_net()
    twin = as_conv2d(net)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, 30, generator=g, dtype=torch.float64) + 0.3
    one, two = fit(net, x), fit(twin, x[:, :, None])
    assert one.names == two.names
    for name in one.names:
        for kind in KINDS:
            a, b = getattr(one[name], kind), getattr(two[name], kind)
            assert_close(a, b.reshape(a.shape), 1e-10)
    t = active_target(net, x)
    for cls in METHODS:
        assert_close(explain(cls, net, one, x, t), explain(cls, twin, two, x[:, :, None], t)[:, :, 0], 1e-10)


def test_conv3d_with_depth_one_kernels_equals_conv2d():
    """Patterns: every depth slice is one more image of the 2-D form (the sums do not depend
    on how samples are cut). Explanations: a depth of one."""
    torch.manual_seed(1)
    c3 = [nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), nn.Conv3d(4, 3, (1, 3, 3), stride=(1, 2, 2), groups=1)]
    c2 = [nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, stride=2)]
    with torch.no_grad():
        for a, b in zip(c3, c2):
            b.weight.copy_(a.weight[:, :, 0])
            b.bias.copy_(a.bias)
    deep3 = nn.Sequential(c3[0], nn.ReLU(), c3[1], nn.ReLU()).double().eval()
    deep2 = nn.Sequential(c2[0], nn.ReLU(), c2[1], nn.ReLU()).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 2, 3, 9, 9, generator=g, dtype=torch.float64)
    one = fit(deep3, x, batch=5)
    two = fit(deep2, x.transpose(1, 2).reshape(36, 2, 9, 9), batch=7)
    for name in one.names:
        for kind in KINDS:
            a, b = getattr(one[name], kind), getattr(two[name], kind)
            assert_close(a, b.reshape(a.shape), 1e-10)
    head3 = nn.Sequential(deep3, nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double().eval()
    head2 = nn.Sequential(deep2, nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double().eval()
    head2[2].load_state_dict(head3[2].state_dict())
    flat = x[:, :, :1]
    p3, p2 = fit(head3, flat), fit(head2, flat[:, :, 0])
    t = active_target(head2, flat[:, :, 0])
    for cls in METHODS:
        assert_close(explain(cls, head3, p3, flat, t)[:, :, 0], explain(cls, head2, p2, flat[:, :, 0], t), 1e-10)


# ----------------------------------------------------------------------------------
# concatenation against stacked filters
# ----------------------------------------------------------------------------------
class TwoBranches(nn.Module):
    def __init__(self, a: nn.Conv2d, b: nn.Conv2d, fc: nn.Linear):
        super().__init__()
        self.a, self.b, self.fc = a, b, fc

    def forward(self, x):
        x = F.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(F.adaptive_max_pool2d(x, 2).flatten(1))


def test_concatenated_convolutions_equal_one_with_stacked_filters():
    torch.manual_seed(2)
    a, b = nn.Conv2d(3, 2, 3, padding=1).double(), nn.Conv2d(3, 3, 3, padding=1).double()
    fc = nn.Linear(5 * 4, 4).double()
    stacked = nn.Conv2d(3, 5, 3, padding=1).double()
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([a.weight, b.weight]))
        stacked.bias.copy_(torch.cat([a.bias, b.bias]))
    branches = TwoBranches(a, b, fc).eval()
    one = nn.Sequential(stacked, nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(), fc).eval()
    x = family_images(30)
    pb, po = fit(branches, x), fit(one, x)
    for kind in KINDS:
        joined = torch.cat([getattr(pb["a"], kind), getattr(pb["b"], kind)])
        assert_close(joined, getattr(po["0"], kind), 1e-10)
        assert_close(getattr(pb["fc"], kind), getattr(po["4"], kind), 1e-10)
    t = active_target(one, x)
    for cls in METHODS:
        assert_close(explain(cls, branches, pb, x, t), explain(cls, one, po, x, t), 1e-10)


# ----------------------------------------------------------------------------------
# the ReLU family against ReLU
# ----------------------------------------------------------------------------------
def chain(act) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 4, 3), act(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 2), act(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 6), act(), nn.Linear(6, 3)).double().eval()


@pytest.mark.parametrize("act, scale", [(lambda: nn.LeakyReLU(0.0), 1.0), (nn.ReLU6, 0.05)],
                         ids=["LeakyReLU(0)", "ReLU6 below 6"])
def test_relu_family_member_equals_relu(act, scale):
    x = family_images(40) * scale
    other, relu = chain(act), chain(nn.ReLU)
    with torch.no_grad():   # ReLU6 only where nothing reaches 6
        assert all(float(h.max()) < 6 for h in _activations(relu, x))
    po, pr = fit(other, x), fit(relu, x)
    for name in pr.names:
        for kind in KINDS:
            assert_close(getattr(po[name], kind), getattr(pr[name], kind), 1e-12)
    t = active_target(relu, x)
    for cls in METHODS:
        assert_close(explain(cls, other, po, x, t), explain(cls, relu, pr, x, t), 1e-12)


def _activations(net, x):
    outs = []
    for m in net:
        x = m(x)
        if isinstance(m, nn.ReLU):
            outs.append(x)
    return outs


# ----------------------------------------------------------------------------------
# the families: gradient-type methods against autograd and Captum
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(FAMILIES))
def fitted(request):
    name = request.param
    net = family(name)
    x = family_images(48)
    return name, net, x, fit(net, x)


def autograd_input_gradient(net, x, target):
    x = x.clone().requires_grad_(True)
    logits = net(x)
    (grad,) = torch.autograd.grad(logits[:, target].sum(), x)
    return grad, logits.detach()


def test_gradient_and_lrpz_equal_autograd(fitted):
    name, net, x, patterns = fitted
    grad, logits = autograd_input_gradient(net, x, 1)
    assert_close(Gradient(net).attribute(x, 1), grad, 1e-12)
    assert_close(LRPZ(net).attribute(x, 1), x * grad, 1e-12)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0


def test_guided_backprop_and_deconvnet_equal_captum(fitted):
    """Captum's rules act at nn.ReLU modules: compare on the same network written with
    ReLU modules (Inception, DenseNet), and for MobileNet with ReLUs on inputs that never
    reach 6, where ReLU6 is ReLU."""
    captum = pytest.importorskip("captum.attr")
    name, net, x, _ = fitted
    options = {"inception": {"modules": True}, "densenet": {"modules": True},
               "mobilenet": {"act": nn.ReLU}}.get(name, {})
    twin = family(name, **options)
    if name == "mobilenet":
        x = x * 0.05
        with torch.no_grad():
            assert float(twin.head(twin.blocks(twin.act(twin.stem(x)))).max()) < 6
    for ours, theirs in ((GuidedBackprop, captum.GuidedBackprop), (DeconvNet, captum.Deconvolution)):
        expected = theirs(twin).attribute(x.clone(), target=2)
        assert_close(ours(net).attribute(x, 2), expected.detach(), 1e-12)


# ----------------------------------------------------------------------------------
# the families: PatternNet and PatternAttribution against a backward pass written out
# ----------------------------------------------------------------------------------
def _output_module(net: nn.Module, name: str) -> nn.Module:
    """The module whose output is the layer's z: the BatchNorm of a ConvBN or of a conv the
    family writes with its own BatchNorm (read from the family's code, not the toolkit)."""
    modules = dict(net.named_modules())
    parent, _, leaf = name.rpartition(".")
    if leaf == "conv" and hasattr(modules.get(parent), "bn"):
        return modules[parent].bn
    own = {"conv0": "norm0", "conv1": "norm2"}
    if leaf in own and (parent + "." if parent else "") + own[leaf] in modules:
        return modules[(parent + "." if parent else "") + own[leaf]]
    return modules[name]


def _linear_map(module: nn.Module, x, weight):
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.BatchNorm2d):
        return x * weight.reshape(1, -1, 1, 1)
    return F.linear(x, weight)


def _folded_weight(net, name):
    module, out = dict(net.named_modules())[name], _output_module(net, name)
    if isinstance(module, nn.BatchNorm2d):
        return out.weight.detach() / torch.sqrt(out.running_var + out.eps)
    w = module.weight.detach()
    if out is not module:
        w = w * (out.weight / torch.sqrt(out.running_var + out.eps)).detach().reshape(-1, 1, 1, 1)
    return w


def straight_through(net, patterns, x, target, attribution: bool, two_sided: set[str]):
    """PatternNet (or PatternAttribution) by autograd on the network itself: every neuron
    layer's output z is replaced by ``z + (V x - (V x).detach())`` -- the same values, the
    backward of ``V``: its pattern (times its weight), ``a_+`` where ``z > 0`` and ``a_-``
    elsewhere for the layers in ``two_sided``. The pass starts from the logit's value."""
    modules = dict(net.named_modules())
    inputs, handles = {}, []
    for name in patterns.names:
        module = modules[name]
        weights = {kind: getattr(patterns[name], kind) for kind in ("positive", "negative")}
        if attribution:
            weights = {k: v * _folded_weight(net, name) for k, v in weights.items()}

        def keep(mod, args, name=name):
            inputs[name] = args[0]

        def replace(mod, args, z, name=name, module=module, weights=weights):
            layer_input = inputs.pop(name)
            v = _linear_map(module, layer_input, weights["positive"])
            if name in two_sided:
                on = (z > 0).to(z.dtype)
                v = v * on + _linear_map(module, layer_input, weights["negative"]) * (1 - on)
            return z.detach() + (v - v.detach())

        handles.append(module.register_forward_pre_hook(keep))
        handles.append(_output_module(net, name).register_forward_hook(replace))
    try:
        x = x.clone().requires_grad_(True)
        logits = net(x)
        seed = torch.zeros_like(logits)
        seed[:, target] = logits[:, target].detach()
        (result,) = torch.autograd.grad(logits, x, seed)
    finally:
        for h in handles:
            h.remove()
    return result


@pytest.mark.parametrize("cls", [PatternNet, PatternAttribution])
def test_pattern_methods_equal_a_backward_pass_written_out(fitted, cls):
    name, net, x, patterns = fitted
    t = active_target(net, x)
    expected = straight_through(net, patterns, x, t, cls is PatternAttribution, TWO_SIDED[name])
    assert_close(cls(net, patterns).attribute(x, t), expected, 1e-9)
    if TWO_SIDED[name]:   # the negative patterns matter: with a_- = a_+ the result differs
        wrong = straight_through(net, patterns, x, t, cls is PatternAttribution, set())
        assert float((wrong - expected).abs().max()) > 1e-3 * float(expected.abs().max())


def test_leaky_relu_uses_the_negative_pattern():
    net = chain(lambda: nn.LeakyReLU(0.2))
    x = family_images(40)
    patterns = fit(net, x)
    hidden = {"0", "3", "6"}   # each followed directly by its LeakyReLU: z is the mask
    t = active_target(net, x)
    for cls in (PatternNet, PatternAttribution):
        expected = straight_through(net, patterns, x, t, cls is PatternAttribution, hidden)
        assert_close(cls(net, patterns).attribute(x, t), expected, 1e-10)
    only_positive = fit(net, x, kinds=("positive",))
    with pytest.raises(Exception, match="'negative' pattern of layer '0'.*LeakyReLU"):
        PatternNet(net, only_positive).attribute(x, t)


# ----------------------------------------------------------------------------------
# fits: independent of the batch size and of the number of processes
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["densenet", "inception"])
def test_fit_does_not_depend_on_the_batch_size(name):
    net = family(name)
    x = family_images(30)
    whole = fit(net, x, batch=30)
    for size in (1, 7):
        cut = fit(net, x, batch=size)
        for layer in whole.names:
            for kind in KINDS:
                assert_close(getattr(cut[layer], kind), getattr(whole[layer], kind), 1e-9)


def test_two_processes_equal_one(tmp_path):
    run_workers("families", 2, tmp_path)
    for name in ("densenet", "inception"):
        single = fit_patterns(family(name), list(torch.split(family_images(30), 6)), progress=False)
        ranks = [Patterns.load(tmp_path / f"{name}.rank{r}.safetensors", family(name)) for r in range(2)]
        for layer in single.names:
            for kind in KINDS:
                assert torch.equal(getattr(ranks[0][layer], kind), getattr(ranks[1][layer], kind))
                assert_close(getattr(ranks[0][layer], kind), getattr(single[layer], kind), 1e-9)


def test_every_family_traces_as_expected():
    for name in FAMILIES:
        plan = trace(family(name), family_images(2))
        assert plan.forward_verified
        assert {n for n, a in plan.activities.items() if a.passes_inactive} == TWO_SIDED[name]
