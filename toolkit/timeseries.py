"""Multichannel recordings with a known signal: the setting the linear pattern comes from.

An EEG records, at every electrode, a mixture of all the sources in the head: the electric
field of each source spreads through the tissue (*volume conduction*) and reaches every
electrode, more strongly the nearer it is. A decoder that reads a class from such
recordings must therefore combine channels to *cancel* the sources that do not carry the
class, and its weights (the filter) show that cancellation, not where the class-related
activity is. Haufe et al. (2014, "On the interpretation of weight vectors of linear models
in multivariate neuroimaging") transform the filter into the pattern
``a = cov[x, y] / var(y)``, which recovers the signal's spatial distribution: the linear
estimator ``S_a`` of PatternNet.

:func:`make_recordings` draws such recordings, ``channels x time`` per sample, with every
part known::

    x = s + d,   s = y * outer(a_s, h),   d = oscillation + background + sensor noise.

* **Signal:** an event-related response: one source whose spatial pattern ``a_s`` over the
  electrodes comes from volume conduction, with a fixed waveform ``h(t)`` (a small negative
  deflection, then a large positive one, as in an ERP), scaled per sample by ``y``. The
  class is the sign of ``y``; ``|y|`` is drawn from ``[min_amplitude, max_amplitude]``.
* **Distractor:** a strong slow oscillation (a random frequency in the delta band, 1-4 Hz,
  phase and amplitude per sample, independent of ``y``) from a second source whose pattern
  overlaps the signal's channels; background activity of many sources at random places with
  smooth random time courses; and white sensor noise per channel.

A distractor shapes a decoder's filter only where it overlaps the signal both over the
channels *and* in time: a faster rhythm (``oscillation_band=(8, 12)``, alpha) is removed by
the filter's smoothness over time alone, and leaves the filter's channel weights almost
as they would be without it.

The head model is deliberately simple: electrodes on a unit sphere (16 positions of the
10-20 system), sources are radial current dipoles inside it, and the potential at an
electrode is that of a dipole in an infinite homogeneous conductor,
``V(e) = m . (e - p) / |e - p|^3`` -- smooth, positive near the source and reversing sign
far from it, with no skull or scalp layers. It is enough to mix sources across channels
the way volume conduction does; it is not a forward model for real data.

Everything is NumPy; the network side of the course converts with ``torch.from_numpy``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CHANNELS",
    "SAMPLING_RATE",
    "Recordings",
    "electrode_positions",
    "dipole_pattern",
    "response_waveform",
    "make_recordings",
    "window_means",
    "channel_maps",
]

#: The 16 electrodes of the recordings (10-20 system), with their polar angle from the
#: vertex (Cz) and their azimuth from the front, positive to the right, in degrees.
CHANNELS = {
    "Fp1": (90, -18), "Fp2": (90, 18),
    "F3": (62, -40), "Fz": (45, 0), "F4": (62, 40),
    "T7": (90, -90), "C3": (45, -90), "Cz": (0, 0), "C4": (45, 90), "T8": (90, 90),
    "P3": (62, -140), "Pz": (45, 180), "P4": (62, 140),
    "O1": (90, -162), "Oz": (90, 180), "O2": (90, 162),
}
#: Samples per second; 128 time steps are one second.
SAMPLING_RATE = 128

# Sources as (polar angle, azimuth) in degrees and distance from the centre in head radii.
_SIGNAL_SOURCE = (40.0, 180.0, 0.5)  # parietal, below Pz
_OSCILLATION_SOURCE = (65.0, 180.0, 0.5)  # parieto-occipital, between Pz and Oz


@dataclass
class Recordings:
    """Recordings ``x = signal + distractor`` whose parts are known for every sample.

    Attributes
    ----------
    data : numpy.ndarray, (n, channels, times) float32
        The recordings ``x``; ``data == signal + distractor`` holds exactly.
    signal : numpy.ndarray, (n, channels, times) float32
        ``y * outer(signal_pattern, waveform)``.
    distractor : numpy.ndarray, (n, channels, times) float32
        Oscillation, background activity and sensor noise.
    oscillation : numpy.ndarray, (n, channels, times) float32
        The oscillation's part of the distractor.
    oscillation_amplitude : numpy.ndarray, (n,)
        The oscillation's amplitude at its strongest channel, per sample.
    y : numpy.ndarray, (n,) float64
        The class-carrying amplitude of the response.
    labels : numpy.ndarray, (n,) int64
        1 where ``y > 0``, else 0.
    signal_pattern : numpy.ndarray, (channels,)
        ``a_s``: the response's spatial pattern, largest absolute value 1.
    waveform : numpy.ndarray, (times,)
        ``h``: the response's time course, largest absolute value 1.
    oscillation_pattern : numpy.ndarray, (channels,)
        The oscillation's spatial pattern, largest absolute value 1.
    positions : numpy.ndarray, (channels, 2)
        Electrode positions for topographies: azimuthal projection, nose up, the ring
        through Fp1, T7, Oz and T8 at radius 1.
    channels : tuple of str
        Electrode names.
    sampling_rate : float
        Samples per second.
    """

    data: np.ndarray
    signal: np.ndarray
    distractor: np.ndarray
    oscillation: np.ndarray
    oscillation_amplitude: np.ndarray
    y: np.ndarray
    labels: np.ndarray
    signal_pattern: np.ndarray
    waveform: np.ndarray
    oscillation_pattern: np.ndarray
    positions: np.ndarray
    channels: tuple
    sampling_rate: float

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def times(self) -> np.ndarray:
        """The time of every step in seconds, from 0."""
        return np.arange(self.data.shape[2]) / self.sampling_rate

    @property
    def signal_map(self) -> np.ndarray:
        """``outer(a_s, h)``, (channels, times): the signal of a sample with ``y = 1``."""
        return np.outer(self.signal_pattern, self.waveform)

    def signal_mask(self, fraction: float = 0.3) -> np.ndarray:
        """(channels, times) bool: where ``|outer(a_s, h)|`` reaches ``fraction`` of its
        largest value -- the region an explanation should point to."""
        return _above(np.abs(self.signal_map), fraction)

    def distractor_mask(self, fraction: float = 0.3) -> np.ndarray:
        """(channels, times) bool: the channels where the oscillation's pattern reaches
        ``fraction`` of its largest absolute value, at every time step."""
        channels = _above(np.abs(self.oscillation_pattern), fraction)
        return np.repeat(channels[:, None], self.data.shape[2], axis=1)

    def overlap(self) -> float:
        """Cosine of the angle between the signal's and the oscillation's spatial patterns
        (1: the oscillation reaches exactly the signal's channels, in the same proportions)."""
        a, b = self.signal_pattern, self.oscillation_pattern
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))

    def as_ground_truth(self, fraction: float = 0.3):
        """The recordings as :class:`toolkit.data.GroundTruthImages` of one channel,
        ``(n, 1, channels, times)`` (one row per electrode), so that
        :func:`toolkit.compare.ground_truth_scores` scores explanations against them
        (reshape the explanations with :func:`channel_maps`). The masks are
        :meth:`signal_mask` and :meth:`distractor_mask` at ``fraction``."""
        import torch

        from toolkit.data import GroundTruthImages

        def maps(a):
            return torch.from_numpy(channel_maps(a))

        return GroundTruthImages(
            images=maps(self.data), labels=torch.from_numpy(self.labels),
            y=torch.from_numpy(self.y.astype(np.float32)), signal=maps(self.signal),
            distractor=maps(self.distractor),
            signal_mask=torch.from_numpy(self.signal_mask(fraction)),
            distractor_mask=torch.from_numpy(self.distractor_mask(fraction)),
            distractor_amplitude=torch.from_numpy(self.oscillation_amplitude.astype(np.float32)))


def channel_maps(values):
    """Recordings or their explanations, ``(n, channels, times)`` or ``(n, channels, 1,
    times)`` (the input of a 1-D network, or of its Conv2d twin), as one-channel images
    ``(n, 1, channels, times)``: one row per electrode. Works on arrays and tensors alike
    (a reshape, no copy where none is needed)."""
    shape = tuple(values.shape)
    if len(shape) == 4 and shape[2] == 1:
        shape = shape[:2] + shape[3:]
    if len(shape) != 3:
        raise ValueError(f"expected (n, channels, times) or (n, channels, 1, times), got {tuple(values.shape)}")
    return values.reshape(shape[0], 1, shape[1], shape[2])


def window_means(data: np.ndarray, width: int) -> np.ndarray:
    """The mean of every channel over consecutive windows of ``width`` time steps:
    ``(n, channels, times)`` -> ``(n, channels, times // width)``, float64.

    The usual features of a linear decoder of event-related responses: they keep the
    response's time course at the windows' resolution with ``width`` times fewer
    dimensions. Trailing steps that fill no whole window are left out.
    """
    data = np.asarray(data, dtype=float)
    if data.ndim != 3:
        raise ValueError(f"data must be shaped (n, channels, times), got {data.shape}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= data.shape[2]:
        raise ValueError(f"width must be an integer from 1 to the {data.shape[2]} time steps, not {width!r}")
    windows = data.shape[2] // width
    return data[:, :, :windows * width].reshape(*data.shape[:2], windows, width).mean(-1)


def _above(values: np.ndarray, fraction: float) -> np.ndarray:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], not {fraction}")
    return values >= fraction * values.max()


def _on_sphere(polar, azimuth, radius=1.0) -> np.ndarray:
    """Cartesian points (x right, y front, z up) of polar angles and azimuths in degrees."""
    theta, phi = np.deg2rad(np.asarray(polar, float)), np.deg2rad(np.asarray(azimuth, float))
    return radius * np.stack([np.sin(theta) * np.sin(phi), np.sin(theta) * np.cos(phi),
                              np.cos(theta)], axis=-1)


def electrode_positions() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """The electrodes of :data:`CHANNELS`.

    Returns
    -------
    names : tuple of str
    positions : numpy.ndarray, (16, 2)
        Azimuthal equidistant projection (nose up, x to the right): radius = polar angle /
        90 degrees.
    sphere : numpy.ndarray, (16, 3)
        The points on the unit sphere.
    """
    polar, azimuth = np.array(list(CHANNELS.values()), float).T
    radius, phi = polar / 90.0, np.deg2rad(azimuth)
    flat = np.stack([radius * np.sin(phi), radius * np.cos(phi)], axis=1)
    return tuple(CHANNELS), flat, _on_sphere(polar, azimuth)


def dipole_pattern(source, electrodes: np.ndarray) -> np.ndarray:
    """Potential of a radial unit dipole at ``source`` on the ``electrodes`` (volume
    conduction in an infinite homogeneous conductor), scaled to largest absolute value 1.

    Parameters
    ----------
    source : (polar, azimuth, radius)
        Polar angle and azimuth in degrees, distance from the centre in head radii
        (``0 < radius < 1``: inside the head).
    electrodes : numpy.ndarray, (channels, 3)
        Points on the unit sphere.
    """
    polar, azimuth, radius = (float(v) for v in source)
    if not 0 < radius < 1:
        raise ValueError(f"a source must lie inside the head (0 < radius < 1), not at radius {radius}")
    position = _on_sphere(polar, azimuth, radius)
    moment = position / radius  # radial
    offset = electrodes - position
    potential = offset @ moment / np.linalg.norm(offset, axis=1) ** 3
    return potential / np.abs(potential).max()


def response_waveform(times: np.ndarray) -> np.ndarray:
    """An event-related response: a small negative deflection near 0.17 s, then a large
    positive one near 0.35 s (Gaussian bumps), scaled to largest absolute value 1."""
    times = np.asarray(times, float)
    h = np.exp(-0.5 * ((times - 0.35) / 0.06) ** 2) - 0.4 * np.exp(-0.5 * ((times - 0.17) / 0.03) ** 2)
    return h / np.abs(h).max()


def _smooth_time_courses(rng, shape, sampling_rate: float, cutoff: float) -> np.ndarray:
    """White noise low-pass filtered (first order, ``cutoff`` in Hz, circular in time),
    scaled to unit variance per time step: the filter's kernel, measured on an impulse,
    gives the variance to divide out."""
    frequencies = np.fft.rfftfreq(shape[-1], d=1.0 / sampling_rate)
    gain = 1.0 / np.sqrt(1.0 + (frequencies / cutoff) ** 2)

    def low_pass(values):
        return np.fft.irfft(np.fft.rfft(values, axis=-1) * gain, n=shape[-1], axis=-1)

    impulse = np.zeros(shape[-1])
    impulse[0] = 1.0
    return low_pass(rng.standard_normal(shape)) / np.sqrt(np.sum(low_pass(impulse) ** 2))


def make_recordings(n: int, seed=None, *, times: int = 128, min_amplitude: float = 0.3,
                    max_amplitude: float = 0.7, oscillation_scale: float = 2.0,
                    oscillation_band: tuple[float, float] = (1.0, 4.0),
                    background_sources: int = 20, background_scale: float = 0.2,
                    noise_scale: float = 0.5, signal_source=_SIGNAL_SOURCE,
                    oscillation_source=_OSCILLATION_SOURCE) -> Recordings:
    """Draw ``n`` recordings of 16 channels whose signal and distractor are known exactly.

    Parameters
    ----------
    n : int
        Number of samples (trials).
    seed : int or numpy.random.Generator, optional
        The same seed gives the same recordings.
    times : int
        Time steps per sample, at :data:`SAMPLING_RATE` (128: one second).
    min_amplitude, max_amplitude : float
        Range of ``|y|``, the response's amplitude at its strongest channel.
    oscillation_scale : float
        Typical amplitude of the oscillation at its strongest channel (each sample draws
        ``oscillation_scale * U[0.5, 1.5]``).
    oscillation_band : (float, float)
        Range of the oscillation's frequency in Hz (one frequency per sample).
    background_sources : int
        Number of background dipoles at random places inside the head, each with a smooth
        random time course (low-pass below 5 Hz) of standard deviation ``background_scale``
        at its strongest channel.
    noise_scale : float
        Standard deviation of the white sensor noise per channel and time step.
    signal_source, oscillation_source : (polar, azimuth, radius)
        Where the response's and the oscillation's dipoles sit (degrees, degrees, head
        radii). By default the response is parietal and the oscillation parieto-occipital:
        its pattern overlaps the response's channels (:meth:`Recordings.overlap` 0.76).

    Returns
    -------
    Recordings
    """
    for name, value, least in (("n", n, 0), ("times", times, 1), ("background_sources", background_sources, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, not {value!r}")
    for name, value in (("oscillation_scale", oscillation_scale), ("background_scale", background_scale),
                        ("noise_scale", noise_scale)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    if not 0 <= min_amplitude <= max_amplitude:
        raise ValueError("need 0 <= min_amplitude <= max_amplitude")
    low, high = oscillation_band
    if not 0 < low <= high:
        raise ValueError(f"oscillation_band must be (low, high) with 0 < low <= high, not {oscillation_band}")
    rng = np.random.default_rng(seed)
    names, positions, sphere = electrode_positions()
    t = np.arange(times) / SAMPLING_RATE
    a_s, h = dipole_pattern(signal_source, sphere), response_waveform(t)
    a_o = dipole_pattern(oscillation_source, sphere)

    y = np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(min_amplitude, max_amplitude, n)
    amplitude = oscillation_scale * rng.uniform(0.5, 1.5, n)
    frequency = rng.uniform(low, high, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    wave = amplitude[:, None] * np.sin(2 * np.pi * frequency[:, None] * t + phase[:, None])
    oscillation = a_o[None, :, None] * wave[:, None, :]

    sources = np.stack([_random_source(rng) for _ in range(background_sources)]) if background_sources else None
    background = np.zeros((n, len(names), times))
    if sources is not None:
        mixing = np.stack([dipole_pattern(s, sphere) for s in sources], axis=1)  # (channels, sources)
        courses = background_scale * _smooth_time_courses(rng, (n, background_sources, times),
                                                          SAMPLING_RATE, cutoff=5.0)
        background = np.einsum("cs,nst->nct", mixing, courses)
    noise = noise_scale * rng.standard_normal((n, len(names), times))

    signal = (y[:, None, None] * np.outer(a_s, h)).astype(np.float32)
    distractor = (oscillation + background + noise).astype(np.float32)
    return Recordings(
        data=signal + distractor,  # a float32 sum: data == signal + distractor exactly
        signal=signal, distractor=distractor, oscillation=oscillation.astype(np.float32),
        oscillation_amplitude=amplitude,
        y=y, labels=(y > 0).astype(np.int64), signal_pattern=a_s, waveform=h,
        oscillation_pattern=a_o, positions=positions, channels=names,
        sampling_rate=float(SAMPLING_RATE))


def _random_source(rng) -> tuple[float, float, float]:
    """A source position drawn uniformly over the upper half of a ball of radius 0.8
    (polar angle up to 100 degrees, so a little below the electrodes' ring too)."""
    polar = np.rad2deg(np.arccos(rng.uniform(np.cos(np.deg2rad(100)), 1.0)))
    return polar, rng.uniform(-180, 180), 0.8 * rng.uniform(0.2, 1.0) ** (1 / 3)
