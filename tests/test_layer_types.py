"""Every registered neuron-layer adapter (``toolkit.layers.LAYER_TYPES``) against autograd
and brute force: the layer map, its transpose, the patch sums, the cover sums, the layout
of samples, the input sums and shifts, for ordinary, grouped and depthwise convolutions
of every dimension, ``padding="same"`` with an even kernel, a Linear layer on sequences
and standalone BatchNorms. A new layer type needs one example in ``EXAMPLES``; the first
test fails until it has one."""
import pytest
import torch
from torch import nn

from toolkit.layers import LAYER_TYPES, Layer


def _batchnorm(cls, channels):
    bn = cls(channels).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    return bn


def _double(module):
    return module.double().eval()


#: Modules of every registered type with an input, chosen so that strides, padding (also
#: asymmetric), dilation, groups and sequence dimensions are exercised.
EXAMPLES = {
    "linear": lambda: (_double(nn.Linear(5, 3)), torch.randn(2, 4, 5, dtype=torch.float64)),
    "conv1d-same": lambda: (_double(nn.Conv1d(4, 6, 4, padding="same", dilation=2, groups=2)),
                            torch.randn(2, 4, 11, dtype=torch.float64)),
    "conv1d-stride": lambda: (_double(nn.Conv1d(3, 2, 3, stride=2, padding=2)),
                              torch.randn(2, 3, 10, dtype=torch.float64)),
    "conv2d": lambda: (_double(nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))),
                       torch.randn(2, 3, 9, 7, dtype=torch.float64)),
    "conv2d-depthwise": lambda: (_double(nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3)),
                                 torch.randn(2, 3, 8, 7, dtype=torch.float64)),
    "conv2d-valid": lambda: (_double(nn.Conv2d(4, 4, 2, padding="valid", groups=2, bias=False)),
                             torch.randn(2, 4, 5, 5, dtype=torch.float64)),
    "conv3d": lambda: (_double(nn.Conv3d(2, 4, (1, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1), groups=2)),
                       torch.randn(2, 2, 3, 7, 5, dtype=torch.float64)),
    "batchnorm1d": lambda: (_batchnorm(nn.BatchNorm1d, 5), torch.randn(3, 5, dtype=torch.float64)),
    "batchnorm1d-seq": lambda: (_batchnorm(nn.BatchNorm1d, 4), torch.randn(2, 4, 6, dtype=torch.float64)),
    "batchnorm2d": lambda: (_batchnorm(nn.BatchNorm2d, 3), torch.randn(2, 3, 4, 5, dtype=torch.float64)),
    "batchnorm3d": lambda: (_batchnorm(nn.BatchNorm3d, 2), torch.randn(2, 2, 3, 2, 4, dtype=torch.float64)),
}


def test_every_layer_type_has_an_example():
    torch.manual_seed(0)
    covered = {type(EXAMPLES[key]()[0]) for key in EXAMPLES}
    assert set(LAYER_TYPES) == covered


@pytest.fixture(params=list(EXAMPLES))
def example(request):
    torch.manual_seed(0)
    module, x = EXAMPLES[request.param]()
    return Layer("layer", module), module, x


def _buffer(layer, z, per_neuron=2):
    """A random output-shaped buffer with ``per_neuron`` channels per neuron in place of
    the neurons (group by group, as the fit lays it out)."""
    shape = list(z.shape)
    shape[layer.ops.neuron_dim] = per_neuron * layer.out_features
    return torch.randn(shape, dtype=z.dtype)


def _group_of(layer, rows: int, r: int) -> int:
    return r // (rows // layer.groups)


def test_apply_is_the_module_without_its_bias(example):
    layer, module, x = example
    expected = module(x) - module(torch.zeros_like(x))
    torch.testing.assert_close(layer.apply(x, layer.ops.weight()), expected.detach())


def test_transpose_is_the_backward_pass(example):
    layer, module, x = example
    x = x.clone().requires_grad_(True)
    z = layer.apply(x, layer.ops.weight())
    grad = torch.randn_like(z)
    (expected,) = torch.autograd.grad(z, x, grad)
    torch.testing.assert_close(layer.transpose(grad, layer.ops.weight(), x.shape), expected)


def test_patch_sums_equal_a_loop_over_the_samples(example):
    layer, module, x = example
    z = layer.apply(x, layer.ops.weight())
    g = _buffer(layer, z)
    rows, values = layer.group_patches(x), layer.neuron_values(g)
    count = values.shape[1]
    expected = torch.stack([sum(values[s, r] * rows[s, _group_of(layer, count, r)] for s in range(rows.shape[0]))
                            for r in range(count)])
    torch.testing.assert_close(layer.patch_sums(x, g).reshape(count, -1), expected)
    # the patches are the samples the layer maps: W patch = z, each neuron on its group
    w = layer.ops.weight().reshape(layer.out_features, -1)
    groups = [_group_of(layer, layer.out_features, j) for j in range(layer.out_features)]
    mapped = torch.stack([rows[:, groups[j]] @ w[j] for j in range(layer.out_features)], 1)
    torch.testing.assert_close(mapped, layer.neuron_values(z))


def test_cover_sums_are_the_patch_sums_of_an_all_ones_input(example):
    layer, module, x = example
    z = layer.apply(x, layer.ops.weight())
    g = _buffer(layer, z)
    expected = layer.patch_sums(torch.ones_like(x), g)
    torch.testing.assert_close(layer.cover_sums(x.shape, g).expand_as(expected), expected)


def test_input_sums_are_the_patch_sums_of_an_all_ones_output(example):
    layer, module, x = example
    z = layer.apply(x, layer.ops.weight())
    shape = list(z.shape)
    shape[layer.ops.neuron_dim] = layer.groups     # one output row per input group
    expected = layer.patch_sums(x, torch.ones(shape, dtype=z.dtype))
    torch.testing.assert_close(layer.ops.input_sums(x, z.shape), expected.reshape(layer.groups, *expected.shape[1:]))


def test_shifts_and_means(example):
    layer, module, x = example
    z = layer.apply(x, layer.ops.weight())
    rows = layer.group_patches(x)
    shift = layer.ops.input_shift(x)
    assert shift.dim() == len(layer.weight_shape) and shift.shape[0] == layer.groups
    # one row per group holding the mean of each of its input channels
    channel_means = x.movedim(layer.ops.neuron_dim, -1).reshape(-1, x.shape[layer.ops.neuron_dim]).mean(0)
    torch.testing.assert_close(shift.reshape(-1), channel_means)
    torch.testing.assert_close(layer.ops.along_channels(shift, x).expand_as(x).movedim(layer.ops.neuron_dim, -1)
                               .reshape(-1, x.shape[layer.ops.neuron_dim])[0], channel_means)
    torch.testing.assert_close(layer.ops.neuron_means(z), layer.neuron_values(z).mean(0))
    assert rows.shape[0] == layer.neuron_values(z).shape[0] and rows.shape[1] == layer.groups
