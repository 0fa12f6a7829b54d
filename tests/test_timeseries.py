"""toolkit.timeseries: recordings whose signal and distractor are known, checked against
the definitions written out here (outer products, the dipole formula, loops)."""
import numpy as np
import pytest

from toolkit import linear
from toolkit.timeseries import (CHANNELS, SAMPLING_RATE, channel_maps, dipole_pattern,
                                electrode_positions, make_recordings, response_waveform,
                                window_means)


@pytest.fixture(scope="module")
def recordings():
    return make_recordings(400, seed=0)


def test_signal_and_distractor_add_up_to_the_data_exactly(recordings):
    r = recordings
    assert r.data.dtype == r.signal.dtype == r.distractor.dtype == np.float32
    assert np.array_equal(r.data, r.signal + r.distractor)
    assert np.abs(r.distractor).max() > 0 and np.abs(r.signal).max() > 0


def test_the_same_seed_gives_the_same_recordings():
    a, b = make_recordings(50, seed=3), make_recordings(50, seed=3)
    for field in ("data", "signal", "distractor", "oscillation", "y", "labels"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    c = make_recordings(50, seed=4)
    assert not np.array_equal(a.data, c.data) and not np.array_equal(a.y, c.y)
    d = make_recordings(50, seed=np.random.default_rng(3))
    assert np.array_equal(a.data, d.data)


def test_shapes_labels_and_layout(recordings):
    r = recordings
    assert r.data.shape == (400, 16, 128) and len(r) == 400
    assert r.channels == tuple(CHANNELS) and r.positions.shape == (16, 2)
    assert r.sampling_rate == SAMPLING_RATE and r.times[-1] == pytest.approx(127 / 128)
    assert np.array_equal(r.labels, (r.y > 0).astype(np.int64))
    assert 0.3 <= np.abs(r.y).min() and np.abs(r.y).max() <= 0.7
    assert 0.3 < r.labels.mean() < 0.7
    assert make_recordings(3, seed=0, times=64).data.shape == (3, 16, 64)
    # Cz at the centre, the ring through Fp1, T7, Oz, T8 at radius 1, nose up (+y), right +x
    names = list(r.channels)
    position = dict(zip(names, r.positions))
    np.testing.assert_allclose(position["Cz"], [0, 0], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(r.positions[[names.index(c) for c in ("T7", "Oz", "Fp1")]], axis=1), 1)
    assert position["Fz"][1] > 0 > position["Pz"][1] and position["C4"][0] > 0 > position["C3"][0]


def test_signal_lies_in_the_span_of_its_pattern_times_its_waveform(recordings):
    r = recordings
    expected = r.y[:, None, None] * r.signal_pattern[None, :, None] * r.waveform[None, None, :]
    np.testing.assert_allclose(r.signal, expected, rtol=1e-6, atol=1e-7)
    # one direction only: the stacked signals have rank 1, along outer(a_s, h)
    singular = np.linalg.svd(r.signal.reshape(len(r), -1).astype(float), compute_uv=False)
    assert singular[1] < 1e-6 * singular[0]
    assert np.abs(r.signal_pattern).max() == 1 and np.abs(r.waveform).max() == 1
    np.testing.assert_allclose(r.signal_map, np.outer(r.signal_pattern, r.waveform))


def test_waveform_is_a_negative_then_a_larger_positive_deflection():
    t = np.arange(128) / 128
    h = response_waveform(t)
    assert t[np.argmax(h)] == pytest.approx(0.35, abs=0.01) and h.max() == 1
    assert 0.1 < t[np.argmin(h)] < 0.2 and -0.5 < h.min() < -0.2
    assert abs(h[0]) < 1e-6 and abs(h[-1]) < 1e-6


def test_dipole_pattern_is_the_potential_of_a_radial_dipole():
    _, _, sphere = electrode_positions()
    polar, azimuth, radius = 40.0, 180.0, 0.5
    theta, phi = np.deg2rad(polar), np.deg2rad(azimuth)
    p = radius * np.array([np.sin(theta) * np.sin(phi), np.sin(theta) * np.cos(phi), np.cos(theta)])
    expected = np.array([(e - p) @ (p / radius) / np.linalg.norm(e - p) ** 3 for e in sphere])
    pattern = dipole_pattern((polar, azimuth, radius), sphere)
    np.testing.assert_allclose(pattern, expected / np.abs(expected).max(), rtol=1e-12)
    assert list(CHANNELS)[np.argmax(pattern)] == "Pz"
    assert pattern.min() < 0  # the field reverses sign far from the source
    # a shallower source is more focal: its share at the nearest electrode grows
    shallow = dipole_pattern((polar, azimuth, 0.8), sphere)
    assert np.sum(shallow ** 2) < np.sum(pattern ** 2)
    with pytest.raises(ValueError, match="inside the head"):
        dipole_pattern((0, 0, 1.0), sphere)


def test_the_oscillation_overlaps_the_signal_channels(recordings):
    r = recordings
    a_s, a_o = r.signal_pattern, r.oscillation_pattern
    assert r.overlap() == pytest.approx(a_s @ a_o / np.linalg.norm(a_s) / np.linalg.norm(a_o))
    assert r.overlap() > 0.7
    strongest = np.argmax(np.abs(a_s))
    assert abs(a_o[strongest]) >= 0.5 * np.abs(a_o).max()
    # strong: at the signal's own channel the oscillation carries more power than the signal
    assert np.mean(r.oscillation[:, strongest] ** 2) > 2 * np.mean(r.signal[:, strongest] ** 2)
    # every sample's oscillation is a_o times a time course (rank one, along a_o)
    for sample in r.oscillation[:5].astype(float):
        u, s, _ = np.linalg.svd(sample)
        assert s[1] < 1e-5 * s[0]
        assert abs(u[:, 0] @ a_o) == pytest.approx(np.linalg.norm(a_o), rel=1e-5)
    # independent of the class
    assert abs(np.corrcoef(r.oscillation_amplitude, r.y)[0, 1]) < 0.15
    # moved to the front of the head, it no longer overlaps the parietal response
    front = make_recordings(5, seed=0, oscillation_source=(60.0, 0.0, 0.5))
    assert front.overlap() < 0.1


@pytest.mark.parametrize("band", [(1.0, 4.0), (8.0, 12.0)])
def test_the_oscillation_lies_in_its_band(band):
    r = make_recordings(100, seed=1, oscillation_band=band)
    strongest = np.argmax(np.abs(r.oscillation_pattern))
    spectrum = np.abs(np.fft.rfft(r.oscillation[:, strongest].astype(float), axis=1))
    peak = np.fft.rfftfreq(128, 1 / SAMPLING_RATE)[spectrum.argmax(1)]  # 1 Hz bins
    assert np.all((peak >= band[0] - 1) & (peak <= band[1] + 1))


def test_background_and_noise_have_the_requested_size():
    quiet = make_recordings(200, seed=2, oscillation_scale=0, background_sources=0, noise_scale=0.5)
    np.testing.assert_allclose(np.std(quiet.distractor), 0.5, rtol=0.02)
    assert np.abs(quiet.oscillation).max() == 0
    background = make_recordings(400, seed=2, oscillation_scale=0, background_sources=1, noise_scale=0,
                                 background_scale=0.2)
    # one source: every channel is a multiple of its time course, 0.2 at the strongest
    strongest = np.abs(background.distractor).std(axis=(0, 2)).argmax()
    assert np.std(background.distractor[:, strongest]) == pytest.approx(0.2, rel=0.05)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="n must be"):
        make_recordings(-1)
    with pytest.raises(ValueError, match="oscillation_band"):
        make_recordings(2, oscillation_band=(5, 2))
    with pytest.raises(ValueError, match="noise_scale"):
        make_recordings(2, noise_scale=float("nan"))
    with pytest.raises(ValueError, match="min_amplitude"):
        make_recordings(2, min_amplitude=2, max_amplitude=1)
    with pytest.raises(ValueError, match="inside the head"):
        make_recordings(2, signal_source=(0, 0, 1.5))


def test_window_means_against_a_loop(recordings):
    data = recordings.data[:3]
    means = window_means(data, 5)
    assert means.shape == (3, 16, 25)
    for i, c, k in [(0, 0, 0), (1, 7, 12), (2, 15, 24)]:
        assert means[i, c, k] == pytest.approx(np.mean(data[i, c, 5 * k:5 * k + 5].astype(float)))
    with pytest.raises(ValueError, match="width"):
        window_means(data, 0)


def test_channel_maps_and_ground_truth(recordings):
    import torch

    from toolkit.compare import ground_truth_scores

    r = recordings
    assert channel_maps(r.data).shape == (400, 1, 16, 128)
    twin_layout = torch.from_numpy(r.data[:, :, None, :])
    assert torch.equal(channel_maps(twin_layout)[:, 0], torch.from_numpy(r.data))
    with pytest.raises(ValueError, match="expected"):
        channel_maps(r.data[0])
    truth = r.as_ground_truth()
    assert torch.equal(truth.images, truth.signal + truth.distractor)
    assert truth.signal_mask.shape == (16, 128) and truth.signal_mask.sum() > 0
    scores = ground_truth_scores({"truth": truth.signal, "distractor": truth.distractor}, truth,
                                 kinds={"truth": "signal", "distractor": "signal"})
    assert scores.column("signal corr")["truth"] == pytest.approx(1.0)
    assert scores.column("distractor corr")["distractor"] == pytest.approx(1.0)
    assert scores.column("signal corr")["distractor"] < 0.2


def test_the_linear_pattern_recovers_the_signal_and_the_filter_does_not():
    """The setting of Haufe et al. (2014): the least-squares filter over channels x time
    windows cancels the oscillation with weights on channels that carry no signal; its
    pattern cov[x, y] / var(y) is the signal's own map."""
    r = make_recordings(3000, seed=0)
    x = window_means(r.data, 4).reshape(len(r), -1)
    w = linear.fit_filter(x, r.y)
    pattern = linear.LinearEstimator().fit(x, w).pattern_
    truth = window_means(r.signal_map[None], 4).ravel()
    assert np.corrcoef(pattern, truth)[0, 1] > 0.95
    assert np.corrcoef(w, truth)[0, 1] < 0.8
    occipital = [list(CHANNELS).index(c) for c in ("O1", "Oz", "O2")]
    energy = (w.reshape(16, -1) ** 2).sum(1)
    assert energy[occipital].sum() > 0.2 * energy.sum()  # the filter works on the oscillation's channels
    signal_energy = (truth.reshape(16, -1) ** 2).sum(1)
    assert signal_energy[occipital].sum() < 0.02 * signal_energy.sum()  # where there is no signal


# ----------------------------------------------------------------------------------
# the figures
# ----------------------------------------------------------------------------------
def test_topography_reproduces_a_linear_field_inside_the_head():
    """A thin-plate spline reproduces an affine field exactly: the map of values x + 2y at
    the electrodes is x + 2y at every grid point inside the head, and blank outside."""
    from toolkit.plotting.timeseries import HEAD_RADIUS, topography

    _, positions, _ = electrode_positions()
    image = topography(positions[:, 0] + 2 * positions[:, 1], positions, resolution=41)
    surface = np.ma.getdata(image.get_array()).astype(float)
    grid = np.linspace(-HEAD_RADIUS, HEAD_RADIUS, 41)
    gx, gy = np.meshgrid(grid, grid)
    inside = gx ** 2 + gy ** 2 <= HEAD_RADIUS ** 2
    np.testing.assert_allclose(surface[inside], (gx + 2 * gy)[inside], atol=1e-6)
    assert np.isnan(surface[~inside]).all()
    limit = np.abs(positions[:, 0] + 2 * positions[:, 1]).max()
    assert image.get_clim() == pytest.approx((-limit, limit))
    with pytest.raises(ValueError, match="positions"):
        topography(np.zeros(16), positions[:5])


def test_channel_time_images_and_grids(recordings):
    from toolkit.plotting.timeseries import channel_time_grid, channel_time_image, maps_and_topographies

    r = recordings
    image = channel_time_image(r.signal[0], r.times, r.channels)
    np.testing.assert_array_equal(image.get_array(), r.signal[0])
    assert image.get_clim() == pytest.approx((-np.abs(r.signal[0]).max(), np.abs(r.signal[0]).max()))
    assert [t.get_text() for t in image.axes.get_yticklabels()] == list(r.channels)
    with pytest.raises(ValueError, match="16 channels x 128 times"):
        channel_time_image(r.signal[0, :, :64], r.times, r.channels)
    figure = maps_and_topographies({"a": r.signal_map, "b": -r.signal_map}, r.times, r.channels, r.positions, at=0.35)
    assert len(figure.axes) == 4
    marked = figure.axes[0].get_lines()[0].get_xdata()[0]  # the moment of the topographies
    assert marked == pytest.approx(r.times[np.argmin(np.abs(r.times - 0.35))])
    grid = channel_time_grid({"x": r.data[:2], "s": channel_maps(r.signal[:2])}, r.times, r.channels,
                             row_labels=["one", "two"])
    assert len(grid.axes) == 4 and grid.axes[0].get_ylabel() == "one"
    np.testing.assert_array_equal(grid.axes[3].images[0].get_array(), r.signal[1])
    with pytest.raises(ValueError, match="row labels"):
        channel_time_grid({"x": r.data[:2]}, r.times, r.channels, row_labels=["one"])
