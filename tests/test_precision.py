"""Fast fitting settings against a float64 reference.

Fitting patterns streams float64 sums, but the per-batch products may be computed in
float32 (``compute_dtype``), the model may run in float32 with channels-last tensors, and
on a GPU cuBLAS/cuDNN may use TF32. Notebook 04 uses these settings for VGG16 only where
they do not hurt the statistics, and checks them against a float64 fit on a subset
(:func:`toolkit.precision.pattern_difference`). These tests pin the tolerances down on a
small VGG-like network with random weights and random, smooth, offset images:

* float32 model + float32 products vs the float64 reference (``model.double()``, float64
  products): every neuron's pattern within ``RTOL_FLOAT32`` (relative, Euclidean norm),
  for every component fitted on at least 1% of the samples (and 100 samples);
* channels-last model and inputs give the patterns of contiguous ones (float64: to
  round-off; float32: within ``RTOL_FLOAT32``);
* on a GPU (skipped without CUDA), float32 with TF32 and channels-last vs the float64 CPU
  reference, within the looser ``RTOL_TF32`` (TF32 keeps 10 of float32's 23 mantissa bits);
* raw 0..255 integer pixels into a VGG-style float32 network whose first convolution is
  scaled by 1/255: the default fit (float32 products) equals the fit with float64
  products to ``RTOL_RAW_PIXELS``, with the global mean for every pattern tensor, also
  ``a_-`` of a first-layer neuron inactive on 0.1% of the samples (docs/math.md, section
  3.2: the error entered through the weight-gradient kernel's float32 accumulation), with
  the masked mean for every component on 1% of the samples or more.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from toolkit import experiment, precision
from toolkit.patterns import fit_patterns

#: float32 products (and a float32 forward pass) vs float64, CPU. The network here
#: reaches about 1e-5; notebook 04 allows precision.FLOAT32_TOLERANCE (5e-3) on VGG16,
#: whose inactive components a_- lose up to ~1e-3 to float32 cancellation.
RTOL_FLOAT32 = 1e-3
#: contiguous vs channels-last in float64: only the order of the sums differs
RTOL_LAYOUT_FLOAT64 = 1e-9
#: TF32 on a GPU vs float64 on the CPU (not run on a GPU while writing these tests:
#: TF32 keeps 10 mantissa bits, ~5e-4 relative per rounded input)
RTOL_TF32 = 2e-2
#: float32 vs float64 products of one float32 model on raw pixels, per pattern tensor
#: (relative, Frobenius); 2.2e-6 measured, 3.8e-5 with oneDNN's weight gradient
RTOL_RAW_PIXELS = 1e-5

KINDS = ("linear", "positive", "negative")


def small_vgg(seed: int = 0) -> nn.Module:
    """conv-conv-pool-conv-pool-dense-dense with random weights and biases (16x16 inputs)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.normal_(0, 0.1)
    return model.eval()


def smooth_images(n: int = 256, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Correlated neighbouring pixels and a non-zero mean, like normalised photographs:
    the covariances are small differences of large sums, the hard case for float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    x = nn.functional.avg_pool2d(x, 3, stride=1, padding=1) * 2
    return x + torch.tensor([0.5, -0.3, 0.2])[:, None, None]


def batches(x: torch.Tensor, size: int = 64, channels_last: bool = False) -> list[torch.Tensor]:
    parts = torch.split(x, size)
    if channels_last:
        parts = [p.contiguous(memory_format=torch.channels_last) for p in parts]
    return list(parts)


@pytest.fixture(scope="module")
def model():
    return small_vgg()


@pytest.fixture(scope="module")
def images():
    return smooth_images()


@pytest.fixture(scope="module")
def reference(model, images):
    """The float64 reference: float64 model, float64 inputs, float64 products."""
    return fit_patterns(_double(model), batches(images.double()), compute_dtype=torch.float64,
                        progress=False)


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def kept_components(reference) -> int:
    """How many (neuron, component) pairs pattern_difference compares."""
    total = 0
    for name in reference.names:
        s = reference[name]
        floor = max(100, 0.01 * float(s.n))
        total += len(s.n_pos) * (float(s.n) >= floor)
        total += int((s.n_pos >= floor).sum()) + int((s.n - s.n_pos >= floor).sum())
    return total


# ----------------------------------------------------------------------------------
# float32 vs float64 on the CPU
# ----------------------------------------------------------------------------------
def test_float32_products_agree_with_float64_reference(model, images, reference):
    fast = fit_patterns(model, batches(images), compute_dtype=torch.float32, progress=False)
    difference = precision.pattern_difference(fast, reference)
    assert set(difference) == set(reference.names)
    assert max(difference.values()) < RTOL_FLOAT32, difference
    # the comparison is not empty: most components of every layer are compared
    assert kept_components(reference) > 0.8 * sum(3 * len(reference[n].n_pos) for n in reference.names)
    # the linear patterns use every sample: all neurons, no exceptions
    for name in reference.names:
        a, ref = fast[name].linear.double(), reference[name].linear
        rows = (a - ref).reshape(len(ref), -1).norm(dim=1) / ref.reshape(len(ref), -1).norm(dim=1)
        assert float(rows.max()) < RTOL_FLOAT32, name


def test_raw_pixels_float32_products_equal_float64_products(one_thread):
    """The default fit (the products in the model's float32) against float64 products of
    the same float32 model: only the products differ, and with the global mean every
    pattern of every layer, all three kinds, agrees to RTOL_RAW_PIXELS (Frobenius over the
    layer's neurons); with the masked mean every component fitted on 1% of the samples."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1 / 255)
    data = [torch.randint(0, 256, (32, 3, 32, 32)).float() for _ in range(6)]
    fits = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # output neurons never active: a_+ = 0
        for mean_y in ("global", "masked"):
            fits[mean_y] = (fit_patterns(model, data, mean_y=mean_y, progress=False),
                            fit_patterns(model, data, mean_y=mean_y, compute_dtype=torch.float64, progress=False))
    assert torch.backends.mkldnn.enabled  # switched off only around the fit's own products
    default, reference = fits["global"]
    n = reference["0"].n
    assert min(reference["0"].n_pos.min(), n - reference["0"].n_pos.max()) < 0.002 * n  # a rare side
    for name in reference.names:
        for kind in KINDS:
            a, ref = getattr(default[name], kind).double(), getattr(reference[name], kind).double()
            error = float((a - ref).norm() / ref.norm())
            assert error < RTOL_RAW_PIXELS, f"{name}/{kind}: {error:.2e}"
    # the masked convention (the default): every component on 1% of the samples or more
    # (a side of 0.13% loses digits to the float32 sum over the other side, docs/math.md)
    difference = precision.pattern_difference(*fits["masked"])
    assert max(difference.values()) < RTOL_RAW_PIXELS, difference


def test_float64_products_of_a_float32_model_are_closer(model, images, reference):
    """Only the float32 forward pass differs: an order of magnitude below RTOL_FLOAT32."""
    fast = fit_patterns(model, batches(images), compute_dtype=torch.float64, progress=False)
    assert max(precision.pattern_difference(fast, reference).values()) < RTOL_FLOAT32 / 10


def test_sums_stay_float64_whatever_the_compute_dtype(model, images):
    fast = fit_patterns(model, batches(images), compute_dtype=torch.float32, progress=False,
                        keep_statistics=True)
    assert set(fast.statistics) == set(fast.names)
    for stats in fast.statistics.values():
        assert all(t.dtype == torch.float64 for t in stats.tensors().values())
    for p in fast.layers.values():  # the patterns are held in the model's dtype
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in p.tensors().values())


# ----------------------------------------------------------------------------------
# channels-last
# ----------------------------------------------------------------------------------
def test_channels_last_float64_gives_the_same_patterns(model, images, reference):
    model_cl = _double(model).to(memory_format=torch.channels_last)
    assert model_cl[0].weight.is_contiguous(memory_format=torch.channels_last)
    data = batches(images.double(), channels_last=True)
    assert data[0].is_contiguous(memory_format=torch.channels_last) and not data[0].is_contiguous()
    patterns = fit_patterns(model_cl, data, compute_dtype=torch.float64, progress=False)
    for name in reference.names:
        for kind in KINDS:
            torch.testing.assert_close(getattr(patterns[name], kind), getattr(reference[name], kind),
                                       rtol=RTOL_LAYOUT_FLOAT64, atol=RTOL_LAYOUT_FLOAT64)
    # and the counts, exactly
    for name in reference.names:
        assert torch.equal(patterns[name].n_pos, reference[name].n_pos)


def test_channels_last_float32_agrees_with_contiguous_float32(model, images):
    import copy

    contiguous = fit_patterns(model, batches(images), compute_dtype=torch.float32, progress=False)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    patterns = fit_patterns(model_cl, batches(images, channels_last=True), compute_dtype=torch.float32,
                            progress=False)
    assert patterns.fingerprint == contiguous.fingerprint
    assert max(precision.pattern_difference(patterns, contiguous).values()) < RTOL_FLOAT32


# ----------------------------------------------------------------------------------
# the comparison itself
# ----------------------------------------------------------------------------------
def test_pattern_difference_is_zero_for_identical_patterns(reference):
    assert all(v == 0.0 for v in precision.pattern_difference(reference, reference).values())


def test_pattern_difference_sees_a_changed_neuron(reference):
    from toolkit.patterns import LayerPatterns, Patterns

    name = reference.names[1]
    layers = dict(reference.layers)
    changed = reference[name].linear.clone()
    changed[3] *= 1.01
    layers[name] = LayerPatterns(changed, reference[name].positive, reference[name].negative)
    other = Patterns(layers, reference.fingerprint)
    difference = precision.pattern_difference(other, reference)
    assert math.isclose(difference[name], 0.01, rel_tol=1e-9)
    assert all(v == 0.0 for layer, v in difference.items() if layer != name)


def test_pattern_difference_leaves_out_components_with_few_samples(reference):
    """A component on fewer than 1% of the samples (or 100) is ill-conditioned: not compared."""
    from toolkit.patterns import LayerPatterns, Patterns

    rare = []  # (count, layer, kind, neuron) of the components with a few samples
    for name in reference.names:
        s = reference[name]
        for kind, counts in (("positive", s.n_pos), ("negative", s.n - s.n_pos)):
            for j, count in enumerate(counts.tolist()):
                if 0 < count < max(100, 0.01 * float(s.n)):
                    rare.append((count, name, kind, j))
    assert rare, "the test network should have neurons that are almost never (in)active"
    _, name, kind, j = min(rare)
    layers = dict(reference.layers)
    p = reference[name].tensors()
    p[kind] = p[kind].clone()
    p[kind][j] += 1.0
    layers[name] = LayerPatterns(**p)
    other = Patterns(layers, reference.fingerprint)
    assert precision.pattern_difference(other, reference)[name] == 0.0
    assert precision.pattern_difference(other, reference, min_samples=0, min_fraction=0.0)[name] > 0


# ----------------------------------------------------------------------------------
# GPU: TF32 and channels-last against the float64 CPU reference
# ----------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("tf32, rtol", [(False, RTOL_FLOAT32), (True, RTOL_TF32)])
def test_gpu_float32_channels_last_against_float64_cpu_reference(model, images, reference, tf32, rtol):
    import copy

    model_gpu = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last)
    data = [b.cuda() for b in batches(images, channels_last=True)]
    with precision.tf32(tf32):
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        patterns = fit_patterns(model_gpu, data, compute_dtype=torch.float32, progress=False)
    difference = precision.pattern_difference(patterns, reference)
    assert max(difference.values()) < rtol, difference


@cuda
def test_gpu_float64_matches_cpu_float64_reference(model, images, reference):
    model_gpu = _double(model).cuda()
    data = [b.cuda() for b in batches(images.double())]
    patterns = fit_patterns(model_gpu, data, compute_dtype=torch.float64, progress=False)
    assert max(precision.pattern_difference(patterns, reference).values()) < 1e-9


def test_notebook_fast_settings():
    """The notebook's tolerances are within a few times the tested ones; the stand-in
    never fits with the fast settings (its numbers must not depend on the machine)."""
    assert RTOL_FLOAT32 <= precision.FLOAT32_TOLERANCE <= 10 * RTOL_FLOAT32
    assert RTOL_TF32 <= precision.TF32_TOLERANCE <= 10 * RTOL_TF32
    settings = experiment.Config.from_env(environ={"TOOLKIT_MODE": "stand-in"}).fast_settings()
    assert settings == {"compute_dtype": torch.float32, "tf32": False, "channels_last": False,
                        "tolerance": precision.FLOAT32_TOLERANCE, "use": False}


def test_tf32_context_restores_the_settings():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with precision.tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with precision.tf32(False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# ----------------------------------------------------------------------------------
# toolkit.experiment: notebook 04's choice between a full run and the stand-in
# ----------------------------------------------------------------------------------
@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty torch cache, so no pretrained weights are found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def fake_imagenet(root, splits=("train", "val")):
    for split in splits:
        (root / split / "n01440764").mkdir(parents=True)
    return root


def test_config_without_weights_or_data_is_the_stand_in(no_cache):
    config = experiment.Config.from_env(environ={})
    assert config.mode == "stand-in" and not config.is_full
    assert config.sizes == experiment.STAND_IN_SIZES and config.device.type == "cpu"
    assert len(config.missing) == 2 and "TOOLKIT_IMAGENET" in config.missing[1]
    banner = config.banner()
    assert "STAND-IN MODE" in banner and "NOT VGG16" in banner
    assert str(no_cache) not in banner  # machine-independent (it is checked notebook output)
    needs = config.full_run_needs()
    for name in ("TOOLKIT_VGG16_WEIGHTS", "TOOLKIT_IMAGENET", "TOOLKIT_PATTERNS", "vgg16-397923af.pth",
                 "train/", "val/", "total"):
        assert name in needs


def test_config_with_weights_and_imagenet_is_a_full_run(no_cache):
    weights = no_cache / "vgg16.pth"
    weights.write_bytes(b"")
    root = fake_imagenet(no_cache / "imagenet")
    environ = {"TOOLKIT_VGG16_WEIGHTS": str(weights), "TOOLKIT_IMAGENET": str(root), "TOOLKIT_DEVICE": "cpu"}
    config = experiment.Config.from_env(environ=environ)
    assert config.is_full and config.missing == () and config.sizes == experiment.FULL_SIZES
    assert config.weights == str(weights) and config.imagenet == root
    assert config.banner().startswith("FULL MODE")
    assert "WARNING" in config.describe()  # a full run on the CPU
    # asked for the stand-in, it is the stand-in
    assert experiment.Config.from_env(environ=environ | {"TOOLKIT_MODE": "stand-in"}).mode == "stand-in"


def test_config_weights_from_torch_cache(no_cache):
    from toolkit.zoo import weights_cache_path

    cached = weights_cache_path("vgg16")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    root = fake_imagenet(no_cache / "imagenet")
    config = experiment.Config.from_env(environ={"TOOLKIT_IMAGENET": str(root)})
    assert config.is_full and config.weights == "DEFAULT"


def test_config_patterns_file_makes_train_optional(no_cache):
    weights = no_cache / "w.pth"
    weights.write_bytes(b"")
    root = fake_imagenet(no_cache / "imagenet", splits=("val",))
    environ = {"TOOLKIT_VGG16_WEIGHTS": str(weights), "TOOLKIT_IMAGENET": str(root)}
    config = experiment.Config.from_env(environ=environ)
    assert config.mode == "stand-in" and "train/" in config.missing[0]
    patterns = no_cache / "vgg16.patterns.safetensors"
    patterns.write_bytes(b"")
    assert experiment.Config.from_env(environ=environ | {"TOOLKIT_PATTERNS": str(patterns)}).is_full


@pytest.mark.parametrize("variable, value, message", [
    ("TOOLKIT_IMAGENET", "/no/such/imagenet", "no such folder"),
    ("TOOLKIT_VGG16_WEIGHTS", "/no/such/vgg16.pth", "no such file"),
    ("TOOLKIT_PATTERNS", "/no/such/folder/p.safetensors", "neither the file nor its folder"),
    ("TOOLKIT_MODE", "fast", "choose one of"),
    ("TOOLKIT_MODE", "full", "a full run is missing"),
])
def test_config_errors_name_the_problem(no_cache, variable, value, message):
    with pytest.raises(ValueError, match=message):
        experiment.Config.from_env(environ={variable: value})


def test_time_estimate_scales_with_the_sizes_and_reads_benchmark_rates(tmp_path):
    sizes = experiment.FULL_SIZES
    rates = experiment.ASSUMED_RATES
    base = experiment.estimate_seconds(sizes, rates)
    double = experiment.estimate_seconds(replace_sizes(sizes, fit_images=2 * sizes.fit_images), rates)
    assert math.isclose(double["fit patterns"], 2 * base["fit patterns"])
    assert double["region perturbation"] == base["region perturbation"]
    result = {"model": "vgg16", "size": 224, "batch": 64, "device": "GPU X",
              "images_per_second": {"forward": 2000.0, "fitting": 800.0, "Gradient": 1000.0, "LRP-z": 900.0},
              "quality": {"moments_images_per_second": 50.0, "closed_form_seconds": {"a": 1.0, "b": 2.0}}}
    path = tmp_path / "bench.json"
    import json

    path.write_text(json.dumps(result))
    measured = experiment.Rates.from_benchmark(path)
    assert (measured.forward, measured.fitting, measured.explanation, measured.quality) == (2000, 800, 900, 50)
    assert measured.quality_closed_form_s == 3.0 and "GPU X" in measured.source


def replace_sizes(sizes, **changes):
    from dataclasses import replace

    return replace(sizes, **changes)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="positive integer"):
        replace_sizes(experiment.STAND_IN_SIZES, fit_images=0)
    with pytest.raises(ValueError, match="regions"):
        replace_sizes(experiment.STAND_IN_SIZES, perturbation_steps=50)  # 64 px: 7 x 7 regions


def test_a_fit_switches_tf32_on_only_for_compute_dtype_tf32():
    """Statistics wrap their products in patterns._tf32: on for compute_dtype="tf32", and
    otherwise the caller's settings (a ``with precision.tf32(...)`` around the fit) stand."""
    from toolkit.patterns import _tf32

    def switches():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    for outer in (False, True):
        with precision.tf32(outer):
            with _tf32(False):
                assert switches() == (outer, outer)
            with _tf32(True):
                assert switches() == (True, True)
            assert switches() == (outer, outer)
