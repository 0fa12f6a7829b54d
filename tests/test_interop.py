"""The toolkit against the evaluation tools people already use (installed only for the tests).

* Quantus 0.6: ``toolkit.region_perturbation`` equals Quantus's ``RegionPerturbation``, and
  Quantus's randomisation test (MPRT) runs through the adapter, which fits the patterns
  of every randomised copy it is handed;
* Captum: ``NoiseTunnel`` (SmoothGrad) over PatternAttribution equals a SmoothGrad loop;
* MNE-Python: the toy's linear pattern S_a equals MNE's ``LinearModel.patterns_`` (Haufe
  et al. 2014), the external reference of notebook 01.
"""
import copy

import numpy as np
import pytest
import torch

import toolkit
from toolkit import linear, sanity, similarity
from toolkit.data import load_fashion_mnist
from toolkit.interop import QuantusExplainer, captum_attribution
from toolkit.models import load_fashion_cnn


@pytest.fixture(scope="module")
def fashion():
    """The shipped CNN, patterns fitted on 500 training images, 16 test images."""
    torch.set_num_threads(1)
    model = load_fashion_cnn()
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    patterns = toolkit.fit_patterns(model, train[:500], progress=False)
    return model, patterns, train[:128], test[:16]


# ----------------------------------------------------------------------------------
# Quantus
# ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_region_perturbation_equals_quantus(fashion):
    """Quantus records ``f(x0) - f(x_k)`` for k = 1..L; the toolkit's curve is
    ``f(x_k)`` for k = 0..L, so Quantus's curve is ``per_image[:, :1] - per_image[:, 1:]``.
    Both: softmax of the initially predicted class, 4x4 regions from the top-left
    corner, most relevant first by the attribution summed over each region, replaced by 0."""
    quantus = pytest.importorskip("quantus")
    model, patterns, _, images = fashion
    explainer = toolkit.PatternAttribution(model, patterns)
    ours = toolkit.region_perturbation(model, explainer, images, patch=4, steps=10, replace="zero",
                                       progress=False)
    metric = quantus.RegionPerturbation(patch_size=4, regions_evaluation=10, order="morf",
                                        perturb_baseline="black", normalise=False, abs=False,
                                        disable_warnings=True, display_progressbar=False)
    theirs = metric(model=model, x_batch=images.numpy(), y_batch=ours.predicted.numpy(), a_batch=None,
                    explain_func=QuantusExplainer("patternattribution", patterns), softmax=True,
                    device="cpu", batch_size=16)
    converted = (ours.per_image[:, :1] - ours.per_image[:, 1:]).numpy()
    assert np.asarray(theirs).shape == converted.shape == (16, 10)
    # Quantus takes the softmax in float32 (1 ulp at 1 is 1.2e-7, and its curve is a difference
    # of two such probabilities), the toolkit in float64 from the same float32 logits
    np.testing.assert_allclose(np.asarray(theirs), converted, rtol=0, atol=4e-7)
    assert converted[:, -1].mean() > 0.1   # the curve does fall: the comparison is not of zeros


def test_quantus_adapter_takes_numpy_and_gives_numpy(fashion):
    model, patterns, _, images = fashion
    explain = QuantusExplainer("patternnet", patterns)
    targets = np.arange(4)
    out = explain(model=model, inputs=images[:4].numpy(), targets=targets)
    expected = toolkit.PatternNet(model, patterns).attribute(images[:4], torch.as_tensor(targets))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected.numpy())
    assert explain.fits == 0
    with pytest.raises(TypeError, match="explain_func_kwargs"):
        explain(model=model, inputs=images[:1].numpy(), targets=[0], method="other")
    no_data = QuantusExplainer("patternnet")
    with pytest.raises(ValueError, match="no data to fit them on"):
        no_data(model=model, inputs=images[:1].numpy(), targets=[0])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("refit", [True, False])
def test_quantus_randomisation_refits_patterns_for_every_randomised_model(fashion, refit):
    """Quantus's MPRT hands the explain_func the model with one more layer randomised at
    each step; the adapter fits patterns for each of them (or, with refit=False, uses the
    original patterns as stale ones). Every explanation it gave is recomputed here from a
    fit of its own, and Quantus's scores are the toolkit's Spearman similarity of them."""
    quantus = pytest.importorskip("quantus")
    model, patterns, fit_data, images = fashion
    x, y = images[:6], toolkit.models.predict(model, images[:6]).argmax(1)
    adapter = QuantusExplainer("patternattribution", patterns, data=fit_data, refit=refit)
    calls = []

    def recorded(model, inputs, targets, **kwargs):
        out = adapter(model, inputs, targets, **kwargs)
        calls.append((copy.deepcopy(model), torch.as_tensor(inputs), torch.as_tensor(targets), out))
        return out

    metric = quantus.MPRT(layer_order="top_down", similarity_func=quantus.similarity_func.correlation_spearman,
                          abs=True, normalise=True, disable_warnings=True, display_progressbar=False)
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), explain_func=recorded, device="cpu",
                    batch_size=6)
    layers = [name for name in scores if name != "original"]
    assert layers == ["features.0", "features.2", "features.5", "features.7", "classifier.1", "classifier.3"][::-1]
    assert adapter.fits == (len(layers) if refit else 0)
    original = calls[0][3]
    for (network, inputs, targets, out), layer in zip(calls[2:], layers):   # 0, 1: the original model
        if refit:
            fitted = sanity.fit_quietly(network, fit_data, ("linear", "positive"))
        else:
            fitted = sanity.stale_patterns(patterns, network)
        expected = toolkit.PatternAttribution(network, fitted, never_active="linear").attribute(inputs, targets)
        np.testing.assert_array_equal(out, expected.numpy())
        ours = similarity.spearman_similarity(torch.as_tensor(original), torch.as_tensor(out))
        np.testing.assert_allclose(scores[layer], ours, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------
# Captum
# ----------------------------------------------------------------------------------
def test_noise_tunnel_over_pattern_attribution_equals_a_smoothgrad_loop(fashion):
    captum_attr = pytest.importorskip("captum.attr")
    model, patterns, _, images = fashion
    x, target = images[:3], torch.tensor([0, 5, 9])
    explainer = toolkit.PatternAttribution(model, patterns)
    samples, std = 4, 0.2
    torch.manual_seed(11)
    smooth = captum_attr.NoiseTunnel(captum_attribution(explainer)).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=std, target=target)
    # Captum draws all the noise in one call, image after image, sample after sample
    torch.manual_seed(11)
    noise = torch.normal(0, torch.tensor(std).repeat(len(x) * samples, *x.shape[1:]))
    expected = torch.zeros_like(x)
    for i in range(len(x)):
        for s in range(samples):
            noisy = x[i:i + 1] + noise[i * samples + s]
            expected[i] += explainer.attribute(noisy, int(target[i]))[0] / samples
    torch.testing.assert_close(smooth, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(smooth, explainer.attribute(x, target), atol=1e-3)


def test_captum_attribution_refuses_what_cannot_explain():
    pytest.importorskip("captum.attr")
    with pytest.raises(TypeError, match="attribute"):
        captum_attribution(object())


# ----------------------------------------------------------------------------------
# MNE-Python
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("noise_mean, dims", [(0.0, 2), (0.7, 2), (0.3, 5)])
def test_linear_pattern_equals_mne_haufe_patterns(noise_mean, dims):
    """MNE's LinearModel computes patterns_ = cov(X) w (Haufe et al. 2014, one target);
    the toy's S_a pattern is cov[x, y] / (w^T cov[x, y]) with y = w^T x, i.e. the same
    vector divided by w^T cov(X) w."""
    pytest.importorskip("mne")
    from mne.decoding import LinearModel
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(dims)
    a_s, a_d = rng.normal(size=dims), rng.normal(size=dims)
    data = linear.make_data(3000, a_s, a_d, noise_mean=noise_mean, noise_std=0.8, seed=5)
    mne_model = LinearModel(LinearRegression(fit_intercept=False)).fit(data.x, data.y)
    w = linear.fit_filter(data.x, data.y)
    np.testing.assert_allclose(mne_model.filters_, w, rtol=1e-9, atol=1e-12)
    haufe = mne_model.patterns_ / (w @ mne_model.patterns_)
    ours = linear.LinearEstimator().fit(data.x, w).pattern_
    np.testing.assert_allclose(ours, haufe, rtol=1e-9, atol=1e-12)
    if dims == 2:
        np.testing.assert_allclose(ours, a_s / (w @ a_s), atol=0.1)   # and both find the signal
