"""Tests of the streaming driver and of what it makes possible in fitting.

* float32 products on shifted sums (the default for a float32 model) equal float64
  products to 1e-5 (relative, Frobenius) on raw 0..255 pixels and on a deep network;
* a fit of only some patterns equals the same patterns of a full fit, and saves, loads
  and explains as such; what it lacks is named when asked for;
* the sums themselves equal brute-force sums over the samples, in every group layout;
* a checkpoint is bound to its model, data and settings; ``checkpoint_every`` is checked;
* fitting and layer quality share one behaviour for data (tensors, pairs, devices).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from _nets import batches, conv_net, images, layer_inputs_outputs, patch_rows, position_rows
from toolkit.patterns import (KINDS, CheckpointMismatchError, MissingPatternsError, Patterns,
                              Statistics, fit_patterns)
from toolkit.quality import layer_quality


pytestmark = pytest.mark.usefixtures("one_thread")


def fit(model, data, **kwargs) -> Patterns:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # never-active output neurons
        return fit_patterns(model, data, progress=False, **kwargs)


def frobenius_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def deep_net(depth: int = 10) -> nn.Sequential:
    """``depth`` 3x3 convolutions with ReLUs on 3x16x16 inputs, two poolings, a Linear."""
    torch.manual_seed(0)
    layers, channels = [], 3
    for i in range(depth):
        layers += [nn.Conv2d(channels, 12, 3, padding=1), nn.ReLU()]
        channels = 12
        if i in (3, 7):
            layers.append(nn.MaxPool2d(2))
    side = 16 // 2 ** sum(i < depth for i in (3, 7))
    layers += [nn.Flatten(), nn.Linear(12 * side * side, 10)]
    return nn.Sequential(*layers).eval()


def pixels(n: int, seed: int, shape=(3, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float()


# ----------------------------------------------------------------------------------
# precision: float32 products on shifted sums
# ----------------------------------------------------------------------------------
def determined_error(patterns, reference, name: str, kind: str) -> float:
    """Relative Frobenius error of a layer's patterns over the neurons whose side has
    at least 100 samples and 1% of the layer's (the rule of toolkit.precision: a pattern
    of a handful of samples moves with any round-off, whatever the precision)."""
    n, n_pos = float(reference[name].n), reference[name].n_pos
    counts = {"linear": torch.full_like(n_pos, n), "positive": n_pos, "negative": n - n_pos}[kind]
    kept = counts >= max(100, 0.01 * n)
    a = getattr(patterns[name], kind).flatten(1)[kept]
    b = getattr(reference[name], kind).flatten(1)[kept]
    return float((a - b).norm() / b.norm()) if kept.any() else 0.0


@pytest.mark.parametrize("case", ["raw_pixels", "deep"])
def test_float32_products_equal_float64_products(case):
    """Float32 products give the float64 products' patterns to 1e-5 (relative, per layer)
    wherever a side's samples determine its pattern; with the authors' E[y], whose
    covariances are larger, every neuron of every layer does."""
    model = deep_net(depth=3 if case == "raw_pixels" else 12)
    x = pixels(96, seed=1) if case == "raw_pixels" else pixels(96, seed=1) / 255 - 0.4
    data = list(torch.split(x, 16))
    for mean_y in ("masked", "global"):
        default = fit(model, data, mean_y=mean_y)                              # products in float32
        reference = fit(model, data, compute_dtype=torch.float64, mean_y=mean_y)
        for name in reference.names:
            assert default[name].n == reference[name].n
            for kind in KINDS:
                err = determined_error(default, reference, name, kind)
                assert err <= 1e-5, f"{mean_y} {name}/{kind}: {err:.2e}"
                if mean_y == "global":
                    err = frobenius_error(getattr(default[name], kind), getattr(reference[name], kind))
                    assert err <= 1e-5, f"{name}/{kind}: {err:.2e}"


def test_compute_dtype_is_validated():
    model = conv_net()
    for bad in (torch.float16, torch.int32, "tf32", torch.bfloat16, "double"):
        with pytest.raises(ValueError, match="compute_dtype"):
            fit(model, batches(), compute_dtype=bad)


# ----------------------------------------------------------------------------------
# the sums against brute force, in every group layout
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kinds", [KINDS, ("positive",), ("negative",), ("linear",),
                                   ("linear", "positive")])
def test_sums_equal_brute_force(kinds):
    model = conv_net()
    x = images(30)
    patterns = fit(model, list(torch.split(x, 7)), kinds=kinds, keep_statistics=True)
    conv_input, conv_output = layer_inputs_outputs(model, x, outputs={"conv1": "bn1"})["conv1"]
    conv = model.conv1
    patches, z = patch_rows(conv, conv_input), position_rows(conv_output)
    layer = next(iter(patterns.layers))
    from toolkit.layers import trace
    folded = trace(model, x).layers[0]
    y = z - folded.bias()
    active = (z > 0).double()
    expected = {"n": torch.tensor(float(len(patches)), dtype=torch.float64), "sum_x": patches.sum(0),
                "sum_y": y.sum(0)}
    if set(kinds) != {"linear"}:
        expected.update(n_pos=active.sum(0), sum_x_pos=active.T @ patches)
    if set(kinds) & {"positive", "linear"} and set(kinds) != {"linear"}:
        expected.update(sum_xy_pos=(y * active).T @ patches, sum_y_pos=(y * active).sum(0))
    if "negative" in kinds or ("linear" in kinds and len(kinds) > 1):
        expected.update(sum_xy_neg=(y * (1 - active)).T @ patches)
    if "linear" in kinds:
        expected["sum_xy"] = y.T @ patches
    got = patterns.statistics[layer].unshifted()
    if "n_pos" in expected:  # the patterns carry the counts themselves
        assert torch.equal(patterns[layer].n_pos, expected["n_pos"])
    assert conv.weight.shape[1:] == (3, 3, 3)
    for key, t in expected.items():
        g = got[key].reshape(t.shape)
        assert frobenius_error(g, t) < 1e-12, key
    assert patterns.kinds == tuple(k for k in KINDS if k in kinds)


# ----------------------------------------------------------------------------------
# fitting only some patterns
# ----------------------------------------------------------------------------------
def test_positive_only_fit_equals_the_full_fit_and_keeps_its_subset(tmp_path):
    from toolkit.methods import PatternAttribution, PatternNet

    model = conv_net()
    full = fit(model, batches())
    positive = fit(model, batches(), kinds="positive")
    assert positive.kinds == ("positive",)
    for name in full.names:
        assert frobenius_error(positive[name].positive, full[name].positive) < 1e-12
    with pytest.raises(MissingPatternsError, match=r"not the 'negative' pattern.*kinds="):
        positive["conv1"].negative
    positive.save(tmp_path / "p.safetensors")
    loaded = Patterns.load(tmp_path / "p.safetensors", model)
    assert loaded.kinds == ("positive",)
    assert torch.equal(loaded["fc"].positive, positive["fc"].positive)
    x = images(3, seed=5)
    for method in (PatternNet, PatternAttribution):
        torch.testing.assert_close(method(model, loaded).attribute(x, target=1),
                                   method(model, full).attribute(x, target=1), rtol=1e-9, atol=1e-12)
    with pytest.raises(MissingPatternsError, match="'linear' pattern"):
        PatternNet(model, loaded, kind="linear").attribute(x, target=1)
    with pytest.raises(MissingPatternsError, match="'negative' pattern"):
        layer_quality(model, loaded, batches(), estimators=("two_component",), progress=False)


def test_bad_kinds():
    for bad in ((), ("positives",), ["linear", "x"]):
        with pytest.raises(ValueError, match="kinds must be"):
            fit(conv_net(), batches(), kinds=bad)


# ----------------------------------------------------------------------------------
# checkpoints bound to their run
# ----------------------------------------------------------------------------------
def test_checkpoint_refuses_other_data_model_and_settings(tmp_path):
    model, data = conv_net(), batches()
    checkpoint = tmp_path / "fit.ckpt"
    done = fit(model, data, checkpoint=checkpoint, checkpoint_every=3)
    # reused on the same data: the same patterns, without a new pass
    again = fit(model, data, checkpoint=checkpoint)
    for name in done.names:
        assert torch.equal(again[name].positive, done[name].positive)
    other = [b.flip(0) for b in data]   # the same images, in another order
    with pytest.raises(CheckpointMismatchError, match="other data"):
        fit(model, other, checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError, match="only 3"):
        fit(model, data[:3], checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError, match="another model"):
        fit(conv_net(seed=3), data, checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError, match="settings"):
        fit(model, data, checkpoint=checkpoint, kinds=("positive",))
    with pytest.raises(CheckpointMismatchError, match="per-sample shape"):
        fit(model, [images(4)[:, :, :21, :21]] * 10, checkpoint=checkpoint)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="bad.ckpt cannot be read"):
        fit(model, data, checkpoint=tmp_path / "bad.ckpt")


def test_interrupted_fit_with_other_data_is_refused(tmp_path):
    model, data = conv_net(), batches()
    checkpoint = tmp_path / "fit.ckpt"

    def first(k):
        for i, batch in enumerate(data):
            if i == k:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        fit(model, first(5), checkpoint=checkpoint, checkpoint_every=2)
    with pytest.raises(CheckpointMismatchError, match="first 4 batches differ"):
        fit(model, [b * 2 for b in data], checkpoint=checkpoint)


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "10"])
def test_checkpoint_every_is_validated(tmp_path, every):
    with pytest.raises(ValueError, match="checkpoint_every must be a positive"):
        fit(conv_net(), batches(), checkpoint=tmp_path / "c.ckpt", checkpoint_every=every)


# ----------------------------------------------------------------------------------
# one behaviour for every caller
# ----------------------------------------------------------------------------------
def test_tensor_and_pairs_are_taken_alike_by_fit_and_quality():
    model = conv_net()
    x = images(40)
    from_tensor = fit(model, x, batch_size=8)
    from_pairs = fit(model, [(b, torch.zeros(len(b))) for b in torch.split(x, 8)])
    for name in from_tensor.names:
        assert torch.equal(from_tensor[name].positive, from_pairs[name].positive)
    a = layer_quality(model, from_tensor, x, batch_size=8, progress=False)
    b = layer_quality(model, from_tensor, [(t, None) for t in torch.split(x, 8)], progress=False)
    assert a.to_dict() == b.to_dict()


def test_inplace_first_module_leaves_the_callers_data_alone():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 21 * 21, 3)).double()
    x = images(6)
    before = x.clone()
    fit(model, [x])
    assert torch.equal(x, before)


def test_never_active_output_neurons_are_warned_about_and_reported():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, -1e6, 0.0]))
    with pytest.warns(UserWarning, match=r"output neurons \[1\] of layer 'Linear' were never active"):
        patterns = fit_patterns(layer, [torch.randn(50, 4, dtype=torch.float64)], progress=False)
    assert patterns.inactive_outputs() == [1]
    assert "never active on the fitting data: [1]" in patterns.report()


def test_statistics_survive_a_round_trip_through_their_tensors():
    model = conv_net()
    patterns = fit(model, batches(), keep_statistics=True)
    s = patterns.statistics["conv1"]
    copy = Statistics.from_tensors(s.tensors(), s.kinds)
    for key, t in s.unshifted().items():
        assert torch.equal(copy.unshifted()[key], t)
