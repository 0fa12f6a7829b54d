"""Tests of toolkit.patterns: fitting the linear and two-component patterns of a network.

What must hold, each checked against an independent reference:
* one Linear neuron on the toy data gives the NumPy closed form of toolkit.linear
  (LinearEstimator, TwoComponentEstimator, both E[y] conventions) to 1e-8;
* strided, padded, dilated convolutions (with and without bias), a folded BatchNorm and
  max pooling give the patterns of a brute-force reference (explicit patches with
  F.unfold, a loop over neurons, the formulas of docs/math.md, sections 2-3) to 1e-9;
* the patterns do not depend on the batch size, on the number of processes
  (torch.distributed, gloo) or on an interruption resumed from a checkpoint;
* torchvision VGG16, VGG16-BN and AlexNet fit end to end;
* dead and zero-denominator neurons get defined patterns and are counted;
* save/load keeps everything exactly, statistics can be re-estimated;
* the fit frees its statistics unless asked to keep them, and holds the patterns in the
  model's dtype unless float64 is asked for;
* bad input gets clear errors and the user's model is left exactly as it was.
"""
from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from _distributed import quality_tensors, run_workers
from _nets import (batches, conv_net, fold_batchnorm, images, layer_inputs_outputs, patch_rows,
                   position_rows)
from toolkit.layers import UnsupportedLayerError, trace
from toolkit.linear import LinearEstimator, TwoComponentEstimator, fit_filter, make_data
from toolkit.patterns import (CheckpointMismatchError, PatternFileError, PatternMismatchError, Patterns,
                              Statistics, estimate_patterns, fingerprint, fit_patterns)

KINDS = ("linear", "positive", "negative")


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread_for_small_models(request):
    """One thread for the small models; the torchvision models keep every thread."""
    if request.node.originalname != "test_torchvision_model_fits":
        request.getfixturevalue("one_thread")


def fit(model, data, **kwargs) -> Patterns:
    return fit_patterns(model, data, progress=False, **kwargs)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (both float64)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-300)
    return float((actual - expected).abs().max() / scale)


def assert_same_patterns(a: Patterns, b: Patterns, rtol: float) -> None:
    assert a.names == b.names
    for name in a.names:
        for kind in KINDS:
            err = max_relative_error(getattr(a[name], kind), getattr(b[name], kind))
            assert err <= rtol, f"{name}/{kind}: relative error {err:.3g} > {rtol}"


def assert_identical(a: Patterns, b: Patterns) -> None:
    assert a.names == b.names
    for name in a.names:
        for kind in KINDS:
            assert torch.equal(getattr(a[name], kind), getattr(b[name], kind)), f"{name}/{kind}"


# ----------------------------------------------------------------------------------
# 1. one Linear neuron against the NumPy closed form of the toy
# ----------------------------------------------------------------------------------
TOY_CASES = {
    "2d": dict(a_s=[1.0, 0.0], a_d=[1.0, 1.0], noise_mean=0.0),
    # 5-D, random directions, a distractor with a non-zero mean (the conventions differ)
    "5d": dict(a_s=np.random.default_rng(3).normal(size=5), a_d=np.random.default_rng(4).normal(size=5),
               noise_mean=0.7),
}


@pytest.mark.parametrize("case", sorted(TOY_CASES))
def test_linear_neuron_matches_numpy_closed_form(case):
    spec = TOY_CASES[case]
    data = make_data(10_000, spec["a_s"], spec["a_d"], noise_mean=spec["noise_mean"], seed=0)
    w = fit_filter(data.x, data.y)
    neuron = nn.Linear(w.size, 1, bias=False).double()
    with torch.no_grad():
        neuron.weight.copy_(torch.from_numpy(w)[None])
    x = torch.from_numpy(data.x)
    batches_ = torch.split(x, 999)  # uneven batches

    linear = LinearEstimator().fit(data.x, w).pattern_
    for mean_y in ("global", "masked"):
        two = TwoComponentEstimator(mean_y=mean_y).fit(data.x, w)
        patterns = fit(neuron, batches_, mean_y=mean_y)
        assert patterns.names == ["Linear"]  # a bare layer is named after its type
        p = patterns["Linear"]
        for got, want in ((p.linear, linear), (p.positive, two.pattern_positive_),
                          (p.negative, two.pattern_negative_)):
            np.testing.assert_allclose(got.numpy()[0], want, rtol=1e-8, atol=1e-8)
    # the toy's facts: the linear pattern is the signal direction
    np.testing.assert_allclose(linear / np.linalg.norm(linear),
                               spec["a_s"] / np.linalg.norm(spec["a_s"]), atol=0.05)


# ----------------------------------------------------------------------------------
# 2. a small CNN against a brute-force reference
# ----------------------------------------------------------------------------------
def folded(model: nn.Sequential) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight and bias of each neuron layer of conv_net with the BatchNorm folded in, by hand."""
    w2 = model.conv2.weight
    return {"conv1": fold_batchnorm(model.conv1, model.bn1),
            "conv2": (w2, torch.zeros(w2.shape[0], dtype=w2.dtype)),
            "fc": (model.fc.weight, model.fc.bias)}


def brute_force_patterns(model: nn.Sequential, x: torch.Tensor, mean_y: str) -> dict[str, dict]:
    """The patterns of docs/math.md, sections 2-3, one neuron at a time, from explicit patches."""
    result = {}
    weights = folded(model)
    # each layer's output after the BatchNorm, bias included
    for name, (inp, z) in layer_inputs_outputs(model, x, outputs={"conv1": "bn1"}).items():
        module = getattr(model, name)
        weight, bias = (t.detach() for t in weights[name])
        if isinstance(module, nn.Conv2d):
            patches, outputs = patch_rows(module, inp), position_rows(z)      # (N L, D), (N L, J)
        else:
            patches, outputs = inp, z
        # the folded layer applied to the explicit patches is the model's output
        torch.testing.assert_close(patches @ weight.reshape(len(weight), -1).T + bias, outputs,
                                   rtol=1e-12, atol=1e-12)
        rows = {kind: [] for kind in KINDS}
        sums = {key: [] for key in ("sum_y", "sum_xy", "n_pos", "sum_x_pos", "sum_y_pos", "sum_xy_pos")}
        for j in range(weight.shape[0]):
            w = weight[j].reshape(-1)
            y = patches @ w
            active = outputs[:, j] > 0
            for key, value in (("sum_y", y.sum()), ("sum_xy", (patches * y[:, None]).sum(0)),
                               ("n_pos", active.sum().double()), ("sum_x_pos", patches[active].sum(0)),
                               ("sum_y_pos", y[active].sum()),
                               ("sum_xy_pos", (patches[active] * y[active, None]).sum(0))):
                sums[key].append(value)

            def pattern(samples, m):
                if not samples.any():
                    return torch.zeros_like(w)
                xs, ys = patches[samples], y[samples]
                cov = (xs * ys[:, None]).mean(0) - xs.mean(0) * m
                denominator = w @ cov
                return cov if denominator == 0 else cov / denominator

            everything = torch.ones_like(active)
            rows["linear"].append(pattern(everything, y.mean()))
            for kind, side in (("positive", active), ("negative", ~active)):
                m = y.mean() if mean_y == "global" else (y[side].mean() if side.any() else 0.0)
                rows[kind].append(pattern(side, m))
        result[name] = {kind: torch.stack(r).reshape(weight.shape) for kind, r in rows.items()}
        result[name]["statistics"] = {key: torch.stack(v) for key, v in sums.items()}
        result[name]["statistics"].update(n=torch.tensor(float(len(patches)), dtype=torch.float64),
                                          sum_x=patches.sum(0))
    return result


@pytest.mark.parametrize("mean_y", ["global", "masked"])
def test_conv_net_matches_brute_force(mean_y):
    model = conv_net()
    x = images(64)
    patterns = fit(model, torch.split(x, 24), mean_y=mean_y, keep_statistics=True)
    reference = brute_force_patterns(model, x, mean_y)
    assert patterns.names == ["conv1", "conv2", "fc"]
    for name, ref in reference.items():
        stats = patterns.statistics[name].unshifted()
        expected = ref["statistics"]
        assert torch.equal(stats["n"], expected["n"]) and torch.equal(stats["n_pos"], expected["n_pos"])
        assert patterns[name].n == int(expected["n"]) and torch.equal(patterns[name].n_pos, expected["n_pos"])
        for key, t in expected.items():  # the streamed sums themselves
            err = max_relative_error(stats[key].reshape(t.shape), t)
            assert err < 1e-12, f"{name}/{key}: relative error {err:.3g}"
        # both sides of every neuron are populated, so every formula is exercised
        assert 0 < expected["n_pos"].min() and expected["n_pos"].max() < expected["n"]
        for kind in KINDS:
            got = getattr(patterns[name], kind)
            assert got.shape == ref[kind].shape == getattr(model, name).weight.shape
            err = max_relative_error(got, ref[kind])
            assert err < 1e-9, f"{name}/{kind}: relative error {err:.3g}"
    # the two conventions really differ on this data
    other = fit(model, [x], mean_y="masked" if mean_y == "global" else "global")
    assert max_relative_error(other["conv1"].positive, patterns["conv1"].positive) > 1e-3


def test_batch_size_does_not_matter():
    model = conv_net()
    x = images(40)
    whole = fit(model, [x])
    for size in (1, 7):
        patterns = fit(model, torch.split(x, size))
        assert_same_patterns(patterns, whole, rtol=1e-10)
        for name in whole.names:
            assert torch.equal(patterns[name].n_pos, whole[name].n_pos)
            assert patterns[name].n == whole[name].n


def test_linear_layer_on_sequences_counts_every_position():
    """A Linear layer applied to (N, T, F) inputs: every (sample, position) is a sample."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3).double()
    x = torch.randn(20, 5, 6, dtype=torch.float64) + 0.2
    seq = fit(layer, [x])
    flat = fit(layer, [x.reshape(-1, 6)])
    assert seq["Linear"].n == 100
    assert_same_patterns(seq, flat, rtol=1e-12)


# ----------------------------------------------------------------------------------
# 3. several processes, and an interrupted fit resumed from its checkpoint
# ----------------------------------------------------------------------------------
def test_two_processes_equal_one(tmp_path):
    run_workers("conv_net", 2, tmp_path)

    model = conv_net()
    single = fit(model, batches(), keep_statistics=True)
    for case in ("dealt", "sampled"):
        ranks = [Patterns.load(tmp_path / f"{case}.rank{r}.safetensors", model) for r in range(2)]
        assert_identical(ranks[0], ranks[1])
        for name in single.names:
            for key, t in ranks[0].statistics[name].tensors().items():
                assert torch.equal(t, ranks[1].statistics[name].tensors()[key])
            assert int(ranks[0].statistics[name].n) == int(single.statistics[name].n)
        assert_same_patterns(ranks[0], single, rtol=1e-10)
    from safetensors.torch import load_file

    single_quality = quality_tensors(model, single)
    for rank in range(2):  # layer quality: moments summed over the processes
        ranked = load_file(str(tmp_path / f"quality.rank{rank}.safetensors"))
        assert ranked.keys() == single_quality.keys()
        for key, rho in single_quality.items():
            # rho = 1 - sqrt(R^2): where R^2 ~ 0 the square root turns its rounding
            # (1e-16) into 1e-8, so compare rho to 1e-7 and R^2 = (1 - rho)^2 to 1e-12
            torch.testing.assert_close(ranked[key], rho, rtol=0, atol=1e-7, equal_nan=True)
            torch.testing.assert_close((1 - ranked[key]) ** 2, (1 - rho) ** 2, rtol=1e-9,
                                       atol=1e-12, equal_nan=True)
    for rank in range(2):  # one rank got no batch: a clear error on both, no hang
        message = (tmp_path / f"starved.rank{rank}.txt").read_text()
        assert "got no batches" in message, message
    # checkpoints: one per rank, bound to the number of processes and to the data
    for rank in range(2):
        assert_identical(Patterns.load(tmp_path / f"resumed.rank{rank}.safetensors"),
                         Patterns.load(tmp_path / f"dealt.rank{rank}.safetensors"))
        message = (tmp_path / f"other_data.rank{rank}.txt").read_text()
        assert "other data" in message or "another process" in message, message
    from safetensors import safe_open
    with safe_open(str(tmp_path / "dealt.rank0.ckpt"), framework="pt") as f:
        assert f.metadata()["world"] == "2"
    with pytest.raises(CheckpointMismatchError, match="several processes.*this fit has 1"):
        fit(model, batches(), checkpoint=tmp_path / "dealt.ckpt")
    from toolkit.streaming import Checkpoint
    with pytest.raises(CheckpointMismatchError, match="2 processes, this fit has 3"):
        Checkpoint.at(tmp_path / "dealt.ckpt", rank=0, world=3, every=1,
                      model_fingerprint=fingerprint(model))


class Interrupted(Exception):
    pass


def interrupted_after(data, k):
    for i, batch in enumerate(data):
        if i == k:
            raise Interrupted(f"stopped after {k} batches")
        yield batch


def test_interrupted_fit_resumes_from_checkpoint(tmp_path):
    model = conv_net()
    data = batches()
    plain = fit(model, data)
    checkpoint = tmp_path / "fit.ckpt"
    with pytest.raises(Interrupted):
        fit(model, interrupted_after(data, 5), checkpoint=checkpoint, checkpoint_every=2)
    assert checkpoint.exists()
    from safetensors import safe_open
    with safe_open(str(checkpoint), framework="pt") as f:
        assert f.metadata()["batches"] == "4"
    resumed = fit(model, data, checkpoint=checkpoint, checkpoint_every=2)
    assert_same_patterns(resumed, plain, rtol=1e-12)
    for name in plain.names:
        assert resumed[name].n == plain[name].n
    # a checkpoint of another model is refused
    with pytest.raises(PatternMismatchError, match="another model"):
        fit(conv_net(seed=5), data, checkpoint=checkpoint)


# ----------------------------------------------------------------------------------
# 4. torchvision models end to end
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "alexnet"])
def test_torchvision_model_fits(name):
    """One batch of two 64x64 images; VGG16's first classifier layer alone holds three
    4096 x 25088 float64 sums (2.5 GB), freed as its float32 patterns are made."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)

    samples, hooks = {}, []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(
                lambda m, a, out, n=module_name: samples.__setitem__(n, out.numel() // out.shape[1])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    patterns = fit(model, [x])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert patterns.names == list(layers)
    report = patterns.report()
    for layer_name, module in layers.items():
        for kind in KINDS:
            t = getattr(patterns[layer_name], kind)
            assert t.shape == module.weight.shape and t.dtype == torch.float32  # the model's
            assert torch.isfinite(t).all(), f"{layer_name}/{kind}"
        assert patterns[layer_name].n == samples[layer_name]
        assert re.search(rf"^{re.escape(layer_name)}\s+{module.weight.shape[0]}\s+{samples[layer_name]:,}\s",
                         report, re.M), report
    assert patterns.statistics == {}  # freed layer by layer
    if name == "vgg16_bn":  # every convolution has its BatchNorm folded in
        assert all(layer.batchnorm is not None for layer in trace(model, x) if layer.is_conv)


# ----------------------------------------------------------------------------------
# 5. dead neurons and zero denominators
# ----------------------------------------------------------------------------------
def test_dead_neuron_gets_zero_positive_pattern_and_is_counted():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, -1e6, 1e6]))  # neuron 1 never, neuron 2 always active
    data = torch.split(torch.randn(300, 4, dtype=torch.float64), 100)
    for mean_y in ("global", "masked"):
        patterns = fit(layer, data, mean_y=mean_y)
        p = patterns["Linear"]
        assert all(torch.isfinite(getattr(p, kind)).all() for kind in KINDS)
        assert torch.equal(p.positive[1], torch.zeros(4, dtype=torch.float64))
        assert torch.equal(p.negative[2], torch.zeros(4, dtype=torch.float64))
        assert p.positive[0].abs().sum() > 0 and p.negative[0].abs().sum() > 0
        # a dead neuron's negative side is all its samples: its negative pattern is the
        # linear pattern, likewise the positive pattern of an always active one
        if mean_y == "global":
            torch.testing.assert_close(p.negative[1], p.linear[1], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(p.positive[2], p.linear[2], rtol=1e-12, atol=1e-12)
        assert patterns.counts["Linear"] == {"dead": 1, "always_active": 1, "zero_denominator": 0}
        line = patterns.report().splitlines()[2].split()
        assert line == ["Linear", "3", "300", "1", "1", "0"]


def test_zero_denominator_keeps_raw_covariance():
    """w = (1, 0), b = 1: the active samples have y = 0, so w^T cov_+ is exactly 0 while
    the covariance cov_+ = E_+[x y] - E_+[x] E[y] = -(0, 2) * (-1) = (0, 2) is not."""
    layer = nn.Linear(2, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # neuron 1: a zero filter
        layer.bias.copy_(torch.tensor([1.0, 1.0]))
    x = torch.tensor([[0.0, 1.0], [0.0, 3.0], [-2.0, 1.0], [-2.0, -1.0]], dtype=torch.float64)
    patterns = fit(layer, [x[:3], x[3:]], mean_y="global")
    p = patterns["Linear"]
    f64 = dict(dtype=torch.float64)
    # by hand: E[y] = -1; active: E_+[x] = (0, 2), E_+[x y] = 0; inactive: E_-[x] = (-2, 0),
    # E_-[x y] = (4, 0), cov_- = (2, 0), w^T cov_- = 2; all: cov = (2, 0) - (-1, 1)(-1) = (1, 1)
    # (to rounding: the sums are of inputs shifted by the first batch's mean, 1/3 here)
    exact = dict(rtol=0, atol=1e-15)
    torch.testing.assert_close(p.positive[0], torch.tensor([0.0, 2.0], **f64), **exact)
    torch.testing.assert_close(p.negative[0], torch.tensor([1.0, 0.0], **f64), **exact)
    torch.testing.assert_close(p.linear[0], torch.tensor([1.0, 1.0], **f64), **exact)
    # the zero filter: y = 0 everywhere, every covariance is 0: zero patterns, no NaN
    for kind in KINDS:
        assert torch.equal(getattr(p, kind)[1], torch.zeros(2, **f64))
    assert patterns.counts["Linear"] == {"dead": 0, "always_active": 1, "zero_denominator": 2}
    assert patterns.report().splitlines()[2].split() == ["Linear", "2", "4", "0", "1", "2"]
    # the masked convention subtracts E_+[y] = 0: the same covariance, here also raw
    masked = fit(layer, [x], mean_y="masked")["Linear"]
    torch.testing.assert_close(masked.positive[0], torch.tensor([0.0, 0.0], **f64), **exact)


# ----------------------------------------------------------------------------------
# 6. save / load / recompute
# ----------------------------------------------------------------------------------
def file_header(path) -> tuple[dict, dict]:
    """The metadata and the tensor entries of a safetensors file, read as the format says:
    an 8-byte header length, a JSON header of plain tensors (dtype, shape, offsets) and
    text metadata, then raw bytes -- nothing that loading executes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    metadata = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in metadata.values())
    assert all(set(entry) == {"dtype", "shape", "data_offsets"} for entry in header.values())
    assert len(raw) == 8 + size + max(entry["data_offsets"][1] for entry in header.values())
    return metadata, header


def test_save_load_round_trip_and_recompute(tmp_path):
    model = conv_net()
    data = batches()
    patterns = fit(model, data, keep_statistics=True)
    path = tmp_path / "patterns.safetensors"
    patterns.save(path)  # the patterns alone, with their sample counts
    metadata, header = file_header(path)
    assert metadata["version"] == "3"
    assert set(header) == {f"{name}/{kind}" for name in patterns.names for kind in KINDS} | {
        f"{name}/n_pos" for name in patterns.names}
    assert header["conv1/positive"]["dtype"] == "F64" and header["conv1/positive"]["shape"] == [6, 3, 3, 3]
    loaded = Patterns.load(path, model)
    assert loaded.fingerprint == patterns.fingerprint == fingerprint(model)
    assert loaded.mean_y == "masked" and loaded.counts == patterns.counts and loaded.statistics == {}
    assert_identical(loaded, patterns)
    for name in patterns.names:
        assert loaded[name].n == patterns[name].n and torch.equal(loaded[name].n_pos, patterns[name].n_pos)
    assert loaded.report() == patterns.report()
    with pytest.raises(ValueError, match="no statistics"):
        loaded.save(tmp_path / "again.safetensors", statistics=True)

    # with statistics=True the sums come back exactly, and the patterns can be recomputed
    full = tmp_path / "with_statistics.safetensors"
    patterns.save(full, statistics=True)
    assert full.stat().st_size > 2 * path.stat().st_size
    loaded = Patterns.load(full, model)
    assert_identical(loaded, patterns)
    for name in patterns.names:
        for key, t in patterns.statistics[name].tensors().items():
            assert torch.equal(loaded.statistics[name].tensors()[key], t), (name, key)
    plan = trace(model, data[0])
    authors = Patterns.from_statistics(plan, loaded.statistics, loaded.fingerprint, mean_y="global")
    # the same sums, shifted by each side's mean rather than the overall one: equal to round-off
    assert_same_patterns(authors, fit(model, data, mean_y="global"), rtol=1e-10)
    assert authors.mean_y == "global"
    assert max_relative_error(authors["conv1"].positive, patterns["conv1"].positive) > 1e-3


def test_patterns_are_held_and_saved_in_the_model_dtype(tmp_path):
    """A float32 model: float32 patterns in memory and in the file (the size of its
    weights per kind), equal to the float64 patterns of the same fit rounded once."""
    model = conv_net(dtype=torch.float32)
    data = [b.float() for b in batches()]
    patterns = fit(model, data)
    wide = fit(model, data, pattern_dtype=torch.float64)
    assert patterns.dtype == torch.float32 and wide.dtype == torch.float64
    for name in patterns.names:
        for kind in KINDS:
            assert torch.equal(getattr(patterns[name], kind), getattr(wide[name], kind).float())
    path = tmp_path / "p.safetensors"
    patterns.save(path)
    _, header = file_header(path)
    weights = sum(m.weight.numel() for m in (model.conv1, model.conv2, model.fc))
    patterns_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
                         if not k.endswith("/n_pos"))
    assert patterns_bytes == 3 * 4 * weights
    loaded = Patterns.load(path, model)
    assert loaded.dtype == torch.float32
    from toolkit.methods import PatternAttribution, PatternNet

    x = images(4, seed=3).float()
    for method in (PatternNet, PatternAttribution):  # a file explains as the patterns it was saved from
        target = torch.tensor([1, 3, 1, 3])
        assert torch.equal(method(model, loaded).attribute(x, target), method(model, patterns).attribute(x, target))
    assert Patterns.load(path, dtype=torch.float64).dtype == torch.float64
    wide.save(path)
    assert Patterns.load(path).dtype == torch.float64
    wide.save(path, dtype=torch.float32)
    assert_identical(Patterns.load(path), patterns)
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        fit(model, data, pattern_dtype=torch.float16)


def test_the_fit_frees_its_statistics_unless_asked_to_keep_them():
    """Every layer's sums are released when its patterns are made: the accumulators the
    fit streamed into end up empty (and the patterns are the same either way)."""
    import toolkit.patterns as module

    made = []
    original = module.Statistics.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    model, data = conv_net(), batches()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.Statistics, "__init__", recording)
        lean = fit(model, data)
        assert len(made) == 3 and all(s.tensors_ == {} for s in made) and lean.statistics == {}
        made.clear()
        kept = fit(model, data, keep_statistics=True)
        assert len(made) == 3 and all(s.tensors_ for s in made)
        assert {name: s for name, s in kept.statistics.items()} == dict(zip(kept.names, made))
    assert_identical(lean, kept)


def test_the_solve_in_blocks_equals_the_solve_at_once(monkeypatch):
    """Blocks of a few neurons (as VGG16's dense layers are solved) give exactly the
    patterns of one block, zero-denominator counts included."""
    import toolkit.patterns as module

    model, data = conv_net(), batches()
    whole = fit(model, data, keep_statistics=True)
    monkeypatch.setattr(module, "SOLVE_BLOCK_ELEMENTS", 40)  # conv1: 1 neuron, conv2 and fc: 2
    plan = trace(model, data[0])
    blocks = Patterns.from_statistics(plan, whole.statistics, whole.fingerprint)
    assert_identical(blocks, whole)
    assert blocks.counts == whole.counts


def grouped_net() -> tuple[nn.Module, list[torch.Tensor]]:
    """An ordinary, a grouped and a depthwise convolution, a standalone BatchNorm (one
    input per neuron) and a Linear layer, float64, with its batches."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5)).double().eval()
    with torch.no_grad():
        model[6].running_mean.uniform_(-0.2, 0.2)
        model[6].running_var.uniform_(0.5, 2.0)
    return model, list(torch.randn(48, 4, 6, 6, dtype=torch.float64).split(12))


def conv1d_net() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv1d(6, 6, 3, groups=3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 14, 4)).double().eval()
    return model, list((torch.randn(40, 3, 16, dtype=torch.float64) + 0.5).split(10))


@pytest.mark.parametrize("make", [grouped_net, conv1d_net], ids=["grouped", "conv1d"])
@pytest.mark.parametrize("mean_y", ["masked", "global"])
def test_groups_and_side_shifts_solve_in_blocks_save_and_load(make, mean_y, tmp_path, monkeypatch):
    """Grouped and depthwise convolutions, a BatchNorm of one input per neuron, Conv1d,
    and the side shifts of mean_y="masked": the solve in blocks of one neuron gives the
    patterns of the solve at once; a file with the statistics gives back every sum
    (the groups' input sums and the side shifts included) and the same patterns, and the
    patterns recomputed with the other convention from the file equal those from memory."""
    import toolkit.patterns as module

    model, data = make()
    kept = fit(model, data, mean_y=mean_y, keep_statistics=True)
    lean = fit(model, data, mean_y=mean_y)
    assert_identical(lean, kept)
    assert all(("shift_y.y_pos" in s.tensors_) == (mean_y == "masked") for s in kept.statistics.values())
    path = tmp_path / "p.safetensors"
    kept.save(path, statistics=True)
    loaded = Patterns.load(path, model)
    assert_identical(loaded, kept)
    for name, stats in kept.statistics.items():
        assert stats.tensors().keys() == loaded.statistics[name].tensors().keys()
        for key, t in stats.tensors().items():
            assert torch.equal(loaded.statistics[name][key], t), (name, key)
    plan = trace(model, data[0])
    other = "global" if mean_y == "masked" else "masked"
    from_memory = Patterns.from_statistics(plan, kept.statistics, kept.fingerprint, other)
    monkeypatch.setattr(module, "SOLVE_BLOCK_ELEMENTS", 1)  # one neuron at a time
    from_file = Patterns.from_statistics(plan, loaded.statistics, loaded.fingerprint, other, keep=False)
    assert_identical(from_file, from_memory)
    assert from_file.counts == from_memory.counts and loaded.statistics == {}
    # a file whose input sums are of another number of groups is refused, naming a tensor
    from safetensors import safe_open
    from safetensors.torch import save_file

    grouped = plan.names[1]
    with safe_open(str(path), framework="pt") as f:
        metadata, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    stored[f"{grouped}/stats/x.ones"] = stored[f"{grouped}/stats/x.ones"][:1].contiguous()
    save_file(stored, str(tmp_path / "forged.safetensors"), metadata=metadata)
    with pytest.raises(PatternFileError, match=rf"forged.safetensors: the tensor '{grouped}/stats/shift_x' has shape"):
        Patterns.load(tmp_path / "forged.safetensors")


#: The statistics version 1 stored per layer: plain (unshifted) sums.
OLD_STATISTICS_V1 = ("n", "sum_x", "sum_y", "sum_xy", "n_pos", "sum_x_pos", "sum_y_pos", "sum_xy_pos")


def old_file(patterns: Patterns, path, version: str) -> None:
    """A patterns file as versions 1 and 2 wrote it (Patterns.save before version 3):
    every pattern in float64, every layer's statistics (version 1: the plain sums of its
    older layout; version 2: today's), no active counts."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in patterns.layers.items():
        for kind, t in p.tensors().items():
            tensors[f"{name}/{kind}"] = t.double().contiguous()
        stats = patterns.statistics[name]
        if version == "1":
            plain = stats.unshifted()
            for key in OLD_STATISTICS_V1:
                tensors[f"{name}/stats/{key}"] = plain[key].contiguous()
        else:
            for key, t in stats.tensors().items():
                tensors[f"{name}/stats/{key}"] = t.contiguous()
    metadata = {"format": "patternnet-toolkit-patterns", "version": version,
                "fingerprint": patterns.fingerprint, "mean_y": patterns.mean_y,
                "layers": json.dumps(patterns.names), "counts": json.dumps(patterns.counts)}
    if version == "2":
        metadata["kinds"] = json.dumps({name: list(p.kinds) for name, p in patterns.layers.items()})
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("version", ["1", "2"])
def test_files_of_older_versions_still_load(tmp_path, version):
    model = conv_net()
    patterns = fit(model, batches(), keep_statistics=True)
    path = tmp_path / f"v{version}.safetensors"
    old_file(patterns, path, version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = Patterns.load(path, model)
    assert_identical(loaded, patterns)
    assert loaded.report() == patterns.report() and loaded.inactive_outputs() == patterns.inactive_outputs()
    for name in patterns.names:
        assert loaded[name].n == patterns[name].n and torch.equal(loaded[name].n_pos, patterns[name].n_pos)
    if version == "1":  # the statistics of the older layout are left out, with a word
        assert loaded.statistics == {} and any("older version" in str(w.message) for w in caught)
    else:
        for name in patterns.names:
            for key, t in patterns.statistics[name].tensors().items():
                assert torch.equal(loaded.statistics[name][key], t), (name, key)
    loaded.save(tmp_path / "now.safetensors")  # and they are written in today's version
    assert file_header(tmp_path / "now.safetensors")[0]["version"] == "3"


def test_load_for_another_model_is_refused(tmp_path):
    path = tmp_path / "patterns.safetensors"
    fit(conv_net(seed=0), batches()[:2]).save(path)
    with pytest.raises(PatternMismatchError, match="another model"):
        Patterns.load(path, conv_net(seed=1))
    other = conv_net(seed=0)
    with torch.no_grad():
        other.fc.weight[0, 0] += 0.01  # one weight differs
    with pytest.raises(PatternMismatchError):
        Patterns.load(path, other)
    # a float32 copy of the same model is the same model
    Patterns.load(path, conv_net(seed=0, dtype=torch.float32))
    with pytest.raises(FileNotFoundError):
        Patterns.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------
# 7. the user's model, modes, devices
# ----------------------------------------------------------------------------------
def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


def test_model_is_left_unchanged():
    model = conv_net()
    model.conv1.weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    grads = [p.requires_grad for p in model.parameters()]
    hooks = hook_counts(model)
    fit(model, batches(), checkpoint=None)
    assert hook_counts(model) == hooks == [(0, 0, 0)] * len(hooks)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    for key, t in model.state_dict().items():
        assert torch.equal(t, state[key]), key
    assert not model.training
    # also after a failure in the middle of a batch
    with pytest.raises(ValueError):
        fit(model, [images(3), images(3) * float("nan")])
    assert hook_counts(model) == hooks


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = conv_net()[:-1]
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.drop(self.features(x)))


def test_training_mode_model_is_fitted_in_eval_mode_and_restored():
    torch.manual_seed(0)
    model = WithDropout().double()
    model.train()
    model.head[2].eval()  # a user's mixed setting must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    bn_state = copy.deepcopy(model.features.bn1.state_dict())
    x = images(32)
    patterns = fit(model, torch.split(x, 8))
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, t in model.features.bn1.state_dict().items():  # no running-stat updates
        assert torch.equal(t, bn_state[key]), key
    reference = copy.deepcopy(model).eval()
    assert_identical(patterns, fit(reference, torch.split(x, 8)))
    # and the folded BatchNorm is the eval-mode one: compare with the brute force
    expected = brute_force_patterns(conv_net(), x, "masked")["conv1"]
    assert max_relative_error(patterns["features.conv1"].positive, expected["positive"]) < 1e-9


def test_device_cpu():
    model = conv_net()
    data = batches()[:3]
    default = fit(model, data)
    for device in ("cpu", torch.device("cpu")):
        patterns = fit(model, data, device=device)
        assert_identical(patterns, default)
        for name in patterns.names:
            assert patterns[name].linear.device.type == "cpu"
    kept = fit(model, data, device="cpu", keep_statistics=True)
    for name in kept.names:
        assert all(t.device.type == "cpu" for t in kept.statistics[name].tensors().values())
    assert next(model.parameters()).device.type == "cpu"


def test_inputs_are_cast_to_the_model_dtype_and_float32_products_are_close():
    model = conv_net()
    data = batches()[:4]
    exact = fit(model, data)
    assert_same_patterns(fit(model, [b.float() for b in data]), exact, rtol=1e-6)  # float32 inputs
    model32 = conv_net(dtype=torch.float32)
    fast = fit(model32, data, compute_dtype=torch.float32)
    assert fast.fingerprint == exact.fingerprint
    assert_same_patterns(fast, exact, rtol=1e-3)


# ----------------------------------------------------------------------------------
# 8. bad input
# ----------------------------------------------------------------------------------
def test_unsupported_layer_is_named():
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model.add_module("block", nn.Sequential(nn.Conv2d(4, 4, 3), nn.GELU()))
    with pytest.raises(UnsupportedLayerError, match=r"layer 'block\.1' of type GELU is not supported"):
        fit(model, [torch.randn(2, 3, 9, 9)])
    reflected = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedLayerError, match=r"layer '0' of type Conv2d .*padding_mode='reflect'"):
        fit(reflected, [torch.randn(2, 4, 9, 9)])


@pytest.mark.parametrize("data, error, message", [
    ([], ValueError, "no batches"),
    (iter([]), ValueError, "no batches"),
    ([torch.empty(0, 3, 23, 23, dtype=torch.float64)], ValueError, "batch 0 holds no samples"),
    ([images(4).to(torch.int64)], TypeError, "floating point"),
    ([images(2), images(2).index_fill(2, torch.tensor([3]), float("nan"))], ValueError,
     "batch 1 contains NaN or Inf"),
    ([images(2).index_fill(0, torch.tensor([1]), float("inf"))], ValueError, "batch 0 contains NaN or Inf"),
    ([torch.randn(2, 4, 23, 23, dtype=torch.float64)], ValueError,
     r"cannot run on inputs of shape \(2, 4, 23, 23\)"),
    ([torch.randn(2, 3, 31, 31, dtype=torch.float64)], ValueError,
     r"cannot run on inputs of shape \(2, 3, 31, 31\)"),
    ([images(2), images(2)[:, :, :20]], ValueError,
     r"batch 1: inputs of shape \(2, 3, 20, 23\) differ from the first batch's per-sample shape \(3, 23, 23\)"),
])
def test_bad_data(data, error, message):
    with pytest.raises(error, match=message):
        fit(conv_net(), data)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mean_y must be one of"):
        fit(conv_net(), batches(), mean_y="median")
    with pytest.raises(ValueError, match="no samples"):
        layer = trace(nn.Linear(3, 2), torch.randn(1, 3)).layers[0]
        estimate_patterns(Statistics(layer), torch.ones(2, 3))


def test_masked_side_of_one_sample_has_zero_pattern():
    """Around its own mean, a side with one sample has covariance exactly 0: its pattern is
    0 (counted as a zero denominator), not the direction of the sums' rounding noise, and
    it does not depend on how the data is cut into batches."""
    torch.manual_seed(3)
    layer = nn.Linear(3, 1).double()
    x = torch.randn(50, 3, dtype=torch.float64) + 0.3
    with torch.no_grad():
        z = layer(x)[:, 0]
        layer.bias -= z.min() + 1e-3       # exactly one sample left inactive
    assert int((layer(x) <= 0).sum()) == 1
    for cut in (50, 7, 1):
        patterns = fit(layer, torch.split(x, cut), mean_y="masked")
        assert torch.equal(patterns["Linear"].negative, torch.zeros(1, 3, dtype=torch.float64))
        assert patterns.counts["Linear"]["zero_denominator"] == 1
    authors = fit(layer, [x], mean_y="global")["Linear"].negative   # x (y - E[y]) is not 0
    assert float(authors.abs().max()) > 0.1
