"""Every registered neuron-layer adapter (``toolkit.layers.LAYER_TYPES``) against autograd
and brute force: the layer map, its transpose, the patch sums, the cover sums, and the
layout of samples, the input sums. A new layer type needs one example in ``EXAMPLES``; the first test
fails until it has one."""
import pytest
import torch
from torch import nn

from toolkit.layers import LAYER_TYPES, Layer

torch.manual_seed(0)

#: One module of every registered type with an input, chosen so that strides, padding,
#: dilation and sequence dimensions are exercised.
EXAMPLES = {
    nn.Conv2d: lambda: (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)).double(),
                        torch.randn(2, 3, 9, 7, dtype=torch.float64)),
    nn.Linear: lambda: (nn.Linear(5, 3).double(), torch.randn(2, 4, 5, dtype=torch.float64)),
}


def test_every_layer_type_has_an_example():
    assert set(LAYER_TYPES) == set(EXAMPLES)


@pytest.fixture(params=list(EXAMPLES), ids=lambda t: t.__name__)
def example(request):
    module, x = EXAMPLES[request.param]()
    return Layer("layer", module), module, x


def _buffer(layer, z, rows=6):
    """A random output-shaped buffer with ``rows`` channels in place of the neurons."""
    shape = list(z.shape)
    shape[layer.ops.neuron_dim] = rows
    return torch.randn(shape, dtype=z.dtype)


def test_apply_is_the_module_without_its_bias(example):
    layer, module, x = example
    expected = module(x) - (module(torch.zeros_like(x)) if module.bias is not None else 0)
    torch.testing.assert_close(layer.apply(x, module.weight.detach()), expected.detach())


def test_transpose_is_the_backward_pass(example):
    layer, module, x = example
    x = x.clone().requires_grad_(True)
    z = layer.apply(x, module.weight.detach())
    grad = torch.randn_like(z)
    (expected,) = torch.autograd.grad(z, x, grad)
    torch.testing.assert_close(layer.transpose(grad, module.weight.detach(), x.shape), expected)


def test_patch_sums_equal_a_loop_over_the_samples(example):
    layer, module, x = example
    z = layer.apply(x, module.weight.detach())
    g = _buffer(layer, z)
    rows, values = layer.patches(x), layer.neuron_values(g)
    expected = sum(values[s, :, None] * rows[s][None, :] for s in range(rows.shape[0]))
    torch.testing.assert_close(layer.patch_sums(x, g).reshape(6, -1), expected)
    # the patches are the samples the layer maps: W patch = z
    torch.testing.assert_close(rows @ module.weight.detach().reshape(module.weight.shape[0], -1).T,
                               layer.neuron_values(z))


def test_cover_sums_are_the_patch_sums_of_an_all_ones_input(example):
    layer, module, x = example
    z = layer.apply(x, module.weight.detach())
    g = _buffer(layer, z)
    ones = torch.ones_like(x.narrow(layer.ops.neuron_dim, 0, 1))
    expected = layer.patch_sums(ones, g)
    torch.testing.assert_close(layer.cover_sums(x.shape, g), expected)


def test_input_sums_are_the_patch_sums_of_an_all_ones_output(example):
    layer, module, x = example
    z = layer.apply(x, module.weight.detach())
    ones = torch.ones_like(z.narrow(layer.ops.neuron_dim, 0, 1))
    expected = layer.patch_sums(x, ones)
    torch.testing.assert_close(layer.ops.input_sums(x, z.shape), expected)


def test_shifts_and_means(example):
    layer, module, x = example
    z = layer.apply(x, module.weight.detach())
    rows = layer.patches(x)
    shift = layer.ops.input_shift(x)
    assert shift.dim() == module.weight.dim()
    # one weight-shaped row holding the mean of every input channel
    channel_means = x.movedim(layer.ops.neuron_dim, -1).reshape(-1, x.shape[layer.ops.neuron_dim]).mean(0)
    torch.testing.assert_close(shift.reshape(-1), channel_means)
    torch.testing.assert_close(layer.ops.neuron_means(z), layer.neuron_values(z).mean(0))
    assert rows.shape[0] == layer.neuron_values(z).shape[0]
