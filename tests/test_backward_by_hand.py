"""The backward rules of every method written out by hand in NumPy, as notebook 01b teaches
them, against toolkit.methods to 1e-12 in float64.

The network is the notebook's shape of network: conv-ReLU, conv plus shortcut then ReLU (a
residual addition), 2x2 max-pooling, dense. Here the convolutions are computed from the
input patches (the notebook uses dense matrices): no torch operation enters the reference.
"""
from collections import OrderedDict
from itertools import product
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from _nets import random_images
from toolkit import LRPZ, DeconvNet, Gradient, GuidedBackprop, PatternAttribution, PatternNet
from toolkit.patterns import fit_patterns

SIZE, IN, HIDDEN, CLASSES = 6, 2, 3, 3
POOLED = SIZE // 2


class Block(nn.Module):
    """conv1-ReLU, conv2 plus shortcut-ReLU, max-pooling, dense."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(IN, HIDDEN, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(HIDDEN * POOLED * POOLED, CLASSES)

    def forward(self, x):
        h1 = self.relu1(self.conv1(x))
        return self.fc(self.flatten(self.pool(self.relu2(self.conv2(h1) + h1))))


def images(n, seed):
    return random_images(n, (IN, SIZE, SIZE), seed)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Block().double().eval()
    with torch.no_grad():  # centre the logits, so that every class is active on about half
        logits = model(images(64, seed=99)) - model.fc.bias
        model.fc.bias.copy_(-logits.median(0).values)
    return model


@pytest.fixture(scope="module")
def patterns(net):
    return fit_patterns(net, images(60, seed=1), batch_size=7, progress=False)


# ----------------------------------------------------------------------------------
# the network by hand
# ----------------------------------------------------------------------------------
def unfold(h):
    """(C, S, S) -> (S*S, C*9): the zero-padded 3x3 patch of every position, row-major."""
    padded = np.pad(h, ((0, 0), (1, 1), (1, 1)))
    return np.array([padded[:, r:r + 3, c:c + 3].ravel() for r, c in product(range(SIZE), repeat=2)])


def fold(columns, channels):
    """The transpose of :func:`unfold`: every patch entry added back where it was read."""
    padded = np.zeros((channels, SIZE + 2, SIZE + 2))
    for row, (r, c) in zip(columns, product(range(SIZE), repeat=2)):
        padded[:, r:r + 3, c:c + 3] += row.reshape(channels, 3, 3)
    return padded[:, 1:-1, 1:-1]


def conv(h, kernel, bias):
    return (unfold(h) @ kernel.reshape(len(kernel), -1).T + bias).T.reshape(len(kernel), SIZE, SIZE)


def conv_transpose(r, kernel):
    """``V^T r`` through a convolution with the kernel ``V``."""
    return fold(r.reshape(len(kernel), -1).T @ kernel.reshape(len(kernel), -1), kernel.shape[1])


def numpy_layers(net):
    return {name: (m.weight.detach().numpy(), m.bias.detach().numpy())
            for name, m in (("conv1", net.conv1), ("conv2", net.conv2), ("fc", net.fc))}


def forward(x, layers):
    f = SimpleNamespace(x=x)
    f.z1 = conv(x, *layers["conv1"])
    f.h1 = np.maximum(f.z1, 0)
    f.z2 = conv(f.h1, *layers["conv2"])
    f.u = f.z2 + f.h1
    h2 = np.maximum(f.u, 0)
    windows = h2.reshape(HIDDEN, POOLED, 2, POOLED, 2).transpose(0, 1, 3, 2, 4).reshape(HIDDEN, POOLED, POOLED, 4)
    f.winner = windows.argmax(-1)  # the first largest, in row-major window order
    f.p = windows.max(-1)
    W3, b3 = layers["fc"]
    f.z3 = W3 @ f.p.ravel() + b3
    return f


def unpool(r, winner):
    """The max-pooling's backward step: each window's signal to its winner."""
    out = np.zeros((HIDDEN, POOLED, POOLED, 4))
    np.put_along_axis(out, winner[..., None], r[..., None], axis=-1)
    return out.reshape(HIDDEN, POOLED, POOLED, 2, 2).transpose(0, 1, 3, 2, 4).reshape(HIDDEN, SIZE, SIZE)


RELU_RULES = {
    "mask": lambda r, active: r * active,
    "rectify": lambda r, active: np.maximum(r, 0),
    "guided": lambda r, active: np.maximum(r, 0) * active,
}


def backward(f, target, start, V, relu):
    """The pass of the matrix methods: ``V[name]^T r`` per layer, ``relu`` at the ReLUs, the
    signal unchanged to both summands of the addition."""
    b = SimpleNamespace(z3=np.eye(CLASSES)[target] * start)
    b.p = (V["fc"].T @ b.z3).reshape(HIDDEN, POOLED, POOLED)
    b.u = relu(unpool(b.p, f.winner), f.u > 0)
    b.branch = conv_transpose(b.u, V["conv2"])
    b.h1 = b.branch + b.u
    b.z1 = relu(b.h1, f.z1 > 0)
    b.x = conv_transpose(b.z1, V["conv1"])
    return b


def safe_divide(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def lrp_z(f, target, layers):
    """LRP-z as relevance: the z-rule per layer, the addition split in proportion to its
    summands, starting from the logit."""
    (W1, b1), (W2, b2), (W3, b3) = layers["conv1"], layers["conv2"], layers["fc"]
    R = SimpleNamespace(z3=np.eye(CLASSES)[target] * f.z3[target])
    R.p = (f.p.ravel() * (W3.T @ safe_divide(R.z3, f.z3))).reshape(f.p.shape)
    R.u = unpool(R.p, f.winner)
    share = safe_divide(R.u, f.u)
    R.z2, R.shortcut = f.z2 * share, f.h1 * share
    R.h1 = f.h1 * conv_transpose(safe_divide(R.z2, f.z2), W2) + R.shortcut
    R.x = f.x * conv_transpose(safe_divide(R.h1, f.z1), W1)
    R.biases = sum(float((b[:, None, None] * safe_divide(r, z)).sum())
                   for b, r, z in ((b2, R.z2, f.z2), (b1, R.h1, f.z1))) + b3[target]
    return R


def by_hand(net, patterns, x, target):
    layers = numpy_layers(net)
    W = {name: w for name, (w, _) in layers.items()}
    A = {name: patterns[name].positive.numpy() for name in W}
    f = forward(x, layers)
    logit = f.z3[target]
    return {
        "gradient": backward(f, target, 1.0, W, RELU_RULES["mask"]).x,
        "deconvnet": backward(f, target, 1.0, W, RELU_RULES["rectify"]).x,
        "guided_backprop": backward(f, target, 1.0, W, RELU_RULES["guided"]).x,
        "patternnet": backward(f, target, logit, A, RELU_RULES["mask"]).x,
        "patternattribution": backward(f, target, logit, {k: W[k] * A[k] for k in W}, RELU_RULES["mask"]).x,
        "lrp_z": lrp_z(f, target, layers).x,
    }


EXPLAINERS = OrderedDict(gradient=Gradient, deconvnet=DeconvNet, guided_backprop=GuidedBackprop,
                         patternnet=PatternNet, patternattribution=PatternAttribution, lrp_z=LRPZ)


# ----------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------
def test_the_forward_pass_by_hand_is_the_network(net):
    x = images(4, seed=5)
    with torch.no_grad():
        logits = net(x).numpy()
    layers = numpy_layers(net)
    for i in range(len(x)):
        np.testing.assert_allclose(forward(x[i].numpy(), layers).z3, logits[i], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", list(EXPLAINERS))
def test_every_method_by_hand_equals_the_toolkit(net, patterns, method):
    x = images(4, seed=5)
    explainer = EXPLAINERS[method]
    explainer = explainer(net, patterns) if method.startswith("pattern") else explainer(net)
    for target in range(CLASSES):
        result = explainer.attribute(x, target).numpy()
        for i in range(len(x)):
            expected = by_hand(net, patterns, x[i].numpy(), target)[method]
            assert np.abs(expected).max() > 1e-3
            np.testing.assert_allclose(result[i], expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_the_reference_rules_differ_where_they_should(net, patterns):
    """The three ReLU rules and the three matrices give different results: a reference
    that confused them would not pass the test above by accident."""
    results = by_hand(net, patterns, images(1, seed=6)[0].numpy(), 0)
    names = list(results)
    for i, j in product(range(len(names)), repeat=2):
        if i < j:
            assert not np.allclose(results[names[i]], results[names[j]]), (names[i], names[j])


def test_lrpz_relevance_is_kept_at_the_addition_and_lost_to_the_biases(net):
    layers = numpy_layers(net)
    for i, x in enumerate(images(5, seed=7).numpy()):
        f = forward(x, layers)
        target = i % CLASSES
        R = lrp_z(f, target, layers)
        assert (R.z2 + R.shortcut).sum() == pytest.approx(R.u.sum(), rel=1e-12)
        assert R.x.sum() + R.biases == pytest.approx(f.z3[target], rel=1e-11, abs=1e-12)
        assert abs(R.biases) > 1e-3


def test_patternattribution_counts_the_relevance_of_the_addition_twice(net, patterns):
    """Both summands receive the full signal; conv2's rule keeps the branch's sum except what
    its zero padding receives (w_j^T a_j = 1 over the whole kernel)."""
    layers = numpy_layers(net)
    WA = {name: w * patterns[name].positive.numpy() for name, (w, _) in layers.items()}
    np.testing.assert_allclose(WA["conv2"].reshape(HIDDEN, -1).sum(1), 1, rtol=1e-12)
    for i, x in enumerate(images(3, seed=8).numpy()):
        f = forward(x, layers)
        b = backward(f, i % CLASSES, f.z3[i % CLASSES], WA, RELU_RULES["mask"])
        inside = unfold(np.ones((HIDDEN, SIZE, SIZE)))  # 1 where a patch reads the image, 0 on the padding
        kept = (b.u.reshape(HIDDEN, -1).T * (inside @ WA["conv2"].reshape(HIDDEN, -1).T)).sum()
        assert b.branch.sum() == pytest.approx(kept, rel=1e-12)
        assert b.h1.sum() == pytest.approx(b.u.sum() + kept, rel=1e-12)
        assert not np.isclose(kept, b.u.sum())  # the padding does take a share here
