"""Notebook 04's bookkeeping: a full VGG16/ImageNet run, or a small stand-in that runs anywhere.

The paper's ImageNet experiments need two things a test machine does not have: the
pretrained VGG16 weights and ImageNet. :meth:`Config.from_env` looks for them and decides:

* **full mode** -- the weights (``TOOLKIT_VGG16_WEIGHTS``, or torchvision's file in torch's
  cache) and ImageNet (``TOOLKIT_IMAGENET``) are both there: VGG16 at 224 x 224, patterns
  fitted on half of the training images (or read from ``TOOLKIT_PATTERNS``), rho(S) on
  the other half, region perturbation on validation images, on a GPU if there is one;
* **stand-in mode** -- anything is missing (or ``TOOLKIT_MODE=stand-in``): the same steps
  on a network with VGG16's sixteen layers but a sixteenth of its channels, random weights
  and a read-out fitted to tell the five shipped photographs (``data/images/``) apart, on
  64 x 64 random crops of those photographs, on the CPU. Nothing is downloaded, ever.

This module holds only the choice, the sizes, the time estimate and the data of each
split; the pieces live with their kind: the stand-in network in :mod:`toolkit.models`
(:func:`~toolkit.models.stand_in_model`), the photographs and their crops in
:mod:`toolkit.imagenet`, the check of the fast fitting settings in :mod:`toolkit.precision`.

Environment variables (all optional):

=========================  ===================================================================
``TOOLKIT_VGG16_WEIGHTS``  the VGG16 weights file (``vgg16-397923af.pth`` or a state dict);
                           unset: torchvision's file in torch's cache, if it is there
``TOOLKIT_IMAGENET``       the ImageNet root holding ``train/`` and ``val/``
``TOOLKIT_PATTERNS``       a patterns file: read if it exists (``train/`` may then be absent:
                           rho(S) is measured on ``val/``), otherwise the fitted patterns are
                           written there (and the fit's checkpoint next to it)
``TOOLKIT_MODE``           ``auto`` (default), ``full`` (an error if something is missing) or
                           ``stand-in``
``TOOLKIT_DEVICE``         the device of a full run (default ``cuda`` if available)
``TOOLKIT_WORKERS``        data-loading processes of a full run (default: up to 8)
``TOOLKIT_BENCHMARK``      a JSON file from ``benchmarks/vgg16.py --json``: measured rates for
                           the time estimate of a full run
=========================  ===================================================================
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from toolkit.imagenet import PHOTOGRAPHS, load_photographs, photo_crops
from toolkit.models import stand_in_model
from toolkit.precision import FLOAT32_TOLERANCE, TF32_TOLERANCE, model_dtype

__all__ = [
    "ENVIRONMENT",
    "Sizes",
    "FULL_SIZES",
    "STAND_IN_SIZES",
    "Rates",
    "ASSUMED_RATES",
    "Config",
    "estimate_seconds",
]

#: The environment variables :meth:`Config.from_env` reads, and what they hold.
ENVIRONMENT = {
    "TOOLKIT_VGG16_WEIGHTS": "the VGG16 weights file (unset: torchvision's file in torch's cache)",
    "TOOLKIT_IMAGENET": "the ImageNet root, holding train/ and val/",
    "TOOLKIT_PATTERNS": "optional patterns file: read if it exists, else the fitted patterns are saved there",
    "TOOLKIT_MODE": "auto (default), full or stand-in",
    "TOOLKIT_DEVICE": "device of a full run (default: cuda if available)",
    "TOOLKIT_WORKERS": "data-loading processes of a full run (default: up to 8)",
    "TOOLKIT_BENCHMARK": "rates measured by benchmarks/vgg16.py --json, for the time estimate",
}
MODES = ("auto", "full", "stand-in")


# ----------------------------------------------------------------------------------
# sizes and rates
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """How much of everything a run uses.

    Attributes
    ----------
    fit_images : int
        Images the patterns are fitted on (ImageNet ``train/``).
    quality_images : int
        Images rho(S) of the convolutions is measured on (training images the patterns
        were NOT fitted on); every position of an image is a sample, so a few thousand
        images are plenty.
    quality_dense_images : int
        Images rho(S) of the dense layers is measured on: one sample per image, so many
        more are needed.
    perturbation_images : int
        Validation images of the region-perturbation test.
    perturbation_steps : int
        Regions perturbed, one per step.
    patch : int
        Side of the square regions (9 in the paper).
    random_repeats : int
        Random orderings per image of the baseline.
    batch_size : int
    image_size : int
        Side of the network input (the crop).
    precision_images : int
        Images of the float64 reference fit that checks the fast settings.
    active_neurons : int
        At most this many neurons per layer are measured on the active regime (each
        needs a ``D x D`` float64 moment; see :func:`toolkit.quality.active_regime_neurons`).
    """

    fit_images: int
    quality_images: int
    quality_dense_images: int
    perturbation_images: int
    perturbation_steps: int
    patch: int = 9
    random_repeats: int = 3
    batch_size: int = 64
    image_size: int = 224
    precision_images: int = 256
    active_neurons: int = 8

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Sizes.{name} must be a positive integer, not {value!r}")
        regions = (self.image_size // self.patch) ** 2
        if self.perturbation_steps > regions:
            raise ValueError(f"perturbation_steps={self.perturbation_steps} is more than the {regions} "
                             f"regions of {self.patch}x{self.patch} pixels in a {self.image_size}-pixel image")


#: A full run: the paper's setting, sized for about an hour on one GPU.
FULL_SIZES = Sizes(fit_images=640_000, quality_images=5_000, quality_dense_images=200_000,
                   perturbation_images=1_000, perturbation_steps=100, patch=9, random_repeats=3,
                   batch_size=64, image_size=224, precision_images=256)
#: The stand-in: a couple of minutes on a laptop CPU.
STAND_IN_SIZES = Sizes(fit_images=768, quality_images=128, quality_dense_images=1536,
                       perturbation_images=32, perturbation_steps=20, patch=9, random_repeats=3,
                       batch_size=64, image_size=64, precision_images=128)


@dataclass(frozen=True)
class Rates:
    """Images per second of each step of a full run on one GPU (VGG16, 224 x 224).

    ``explanation`` is the slowest method's rate; ``quality`` the moments pass of the
    convolutions (float64); ``quality_closed_form_s`` the closed form of all 16 layers.
    """

    forward: float
    fitting: float
    explanation: float
    quality: float
    quality_closed_form_s: float
    source: str

    @classmethod
    def from_benchmark(cls, path: str | os.PathLike) -> "Rates":
        """Rates measured by ``benchmarks/vgg16.py --json FILE``."""
        result = json.loads(Path(path).read_text())
        rates = result["images_per_second"]
        methods = [v for k, v in rates.items() if k not in ("forward", "fitting")]
        quality = result.get("quality") or {}
        closed = quality.get("closed_form_seconds") or {}
        return cls(
            forward=rates["forward"], fitting=rates["fitting"], explanation=min(methods),
            quality=quality.get("moments_images_per_second", ASSUMED_RATES.quality),
            quality_closed_form_s=sum(closed.values()) if closed else ASSUMED_RATES.quality_closed_form_s,
            source=(f"measured by benchmarks/vgg16.py ({result['model']} at {result['size']}x{result['size']}, "
                    f"batch {result['batch']}, {result['device']})"),
        )


#: Rates assumed for one H100-class GPU (float32 with TF32 and channels-last): the
#: forward pass of VGG16 at about 1500 images/s, fitting at 4x its cost (the statistics
#: of a convolution are three weight gradients of its size), each explanation method at
#: 2.5x, the float64 moments of the quality measure at about 250 GFLOP per image. NOT
#: measured in this repository: run benchmarks/vgg16.py on the GPU and point
#: TOOLKIT_BENCHMARK at its --json output to use measured rates instead.
ASSUMED_RATES = Rates(forward=1500.0, fitting=375.0, explanation=600.0, quality=100.0,
                      quality_closed_form_s=150.0,
                      source="assumed for one H100-class GPU, not measured (see toolkit/experiment.py)")

#: Ordered perturbation curves of notebook 04: 8 methods, PatternAttribution with S_w,
#: and three methods ranked by |signal|; plus the random order.
PERTURBATION_CURVES = 12


def estimate_seconds(sizes: Sizes, rates: Rates, curves: int = PERTURBATION_CURVES) -> dict[str, float]:
    """Seconds each step of a run of ``sizes`` takes at ``rates`` (data loading not counted).

    Per perturbation image: one explanation and ``steps + 1`` forward passes per ordered
    curve, ``random_repeats * steps`` for the random order.
    """
    forwards = curves * (sizes.perturbation_steps + 1) + sizes.random_repeats * sizes.perturbation_steps
    return {
        "fit patterns": sizes.fit_images / rates.fitting,
        "float64 check": 2 * sizes.precision_images / (rates.fitting / 20),
        "layer quality": (sizes.quality_images / rates.quality + rates.quality_closed_form_s
                          + sizes.quality_dense_images / rates.forward),
        "region perturbation": sizes.perturbation_images * (forwards / rates.forward
                                                            + curves / rates.explanation),
        "figures": 30.0,
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


# ----------------------------------------------------------------------------------
# the stand-in's data
# ----------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _cached_crops(n: int, size: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Crops of the shipped photographs, kept: each split (seed) is asked for more than once."""
    photos, _ = load_photographs()
    return photo_crops(photos, n, size, seed, dtype=dtype)


# ----------------------------------------------------------------------------------
# the configuration
# ----------------------------------------------------------------------------------
def _env_path(environ: Mapping[str, str], name: str) -> Path | None:
    value = environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class Config:
    """What notebook 04 runs on: the mode, the paths, the sizes and the device.

    Build it with :meth:`from_env`. ``missing`` lists what a full run lacked (empty in
    full mode; ``("TOOLKIT_MODE=stand-in",)`` when the stand-in was asked for).
    """

    mode: str
    sizes: Sizes
    full_sizes: Sizes
    weights: str | None
    imagenet: Path | None
    patterns: Path | None
    device: torch.device
    workers: int
    missing: tuple[str, ...]
    rates: Rates

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_env(cls, full: Sizes = FULL_SIZES, stand_in: Sizes = STAND_IN_SIZES,
                 environ: Mapping[str, str] | None = None) -> "Config":
        """Read the environment variables (module docstring) and choose the mode.

        Raises
        ------
        ValueError
            If a variable names a file or folder that does not exist, ``TOOLKIT_MODE`` is
            unknown, or ``TOOLKIT_MODE=full`` while something a full run needs is missing.
        """
        from toolkit.zoo import weights_cache_path

        environ = os.environ if environ is None else environ
        mode = environ.get("TOOLKIT_MODE", "auto").strip().lower() or "auto"
        if mode == "standin":
            mode = "stand-in"
        if mode not in MODES:
            raise ValueError(f"TOOLKIT_MODE={mode!r}: choose one of {', '.join(MODES)}")

        weights_file = _env_path(environ, "TOOLKIT_VGG16_WEIGHTS")
        imagenet = _env_path(environ, "TOOLKIT_IMAGENET")
        patterns = _env_path(environ, "TOOLKIT_PATTERNS")
        if weights_file is not None and not weights_file.is_file():
            raise ValueError(f"TOOLKIT_VGG16_WEIGHTS={weights_file}: no such file")
        if imagenet is not None and not imagenet.is_dir():
            raise ValueError(f"TOOLKIT_IMAGENET={imagenet}: no such folder")
        if patterns is not None and not patterns.exists() and not patterns.parent.is_dir():
            raise ValueError(f"TOOLKIT_PATTERNS={patterns}: neither the file nor its folder exists")

        missing = []
        if weights_file is not None:
            weights = str(weights_file)
        elif weights_cache_path("vgg16").is_file():
            weights = "DEFAULT"
        else:
            weights = None
            missing.append("the VGG16 weights (TOOLKIT_VGG16_WEIGHTS is unset and torch's cache "
                           "has no vgg16-397923af.pth)")
        if imagenet is None:
            missing.append("ImageNet (TOOLKIT_IMAGENET is unset)")
        else:
            need = ["val"] + ([] if patterns is not None and patterns.is_file() else ["train"])
            absent = [split for split in need if not (imagenet / split).is_dir()]
            if absent:
                missing.append(f"ImageNet's {' and '.join(s + '/' for s in absent)} in TOOLKIT_IMAGENET={imagenet}")
        if mode == "full" and missing:
            raise ValueError("TOOLKIT_MODE=full, but a full run is missing " + "; ".join(missing))
        if mode == "stand-in":
            missing = ["TOOLKIT_MODE=stand-in"]

        rates = ASSUMED_RATES
        benchmark = _env_path(environ, "TOOLKIT_BENCHMARK")
        if benchmark is not None:
            rates = Rates.from_benchmark(benchmark)

        if missing:
            return cls("stand-in", stand_in, full, None, None, None, torch.device("cpu"), 0,
                       tuple(missing), rates)
        device = environ.get("TOOLKIT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        workers = int(environ.get("TOOLKIT_WORKERS") or min(8, os.cpu_count() or 1))
        return cls("full", full, full, weights, imagenet, patterns, torch.device(device), workers, (), rates)

    @property
    def is_full(self) -> bool:
        return self.mode == "full"

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: float32 in a full run; float64 for the stand-in, whose printed
        numbers must be the same on every machine (float32 kernels differ between CPUs, and
        the two-component patterns amplify such differences)."""
        return torch.float32 if self.is_full else torch.float64

    # -- what the notebook prints ------------------------------------------------------
    def banner(self) -> str:
        """Which mode, in words that do not depend on the machine."""
        s = self.sizes
        if self.is_full:
            return (f"FULL MODE: pretrained VGG16 at {s.image_size}x{s.image_size} on ImageNet; "
                    f"patterns from {s.fit_images:,} training images, rho(S) on {s.quality_images:,} "
                    f"other training images ({s.quality_dense_images:,} for the dense layers), region "
                    f"perturbation on {s.perturbation_images:,} validation images.")
        line = "=" * 88
        return "\n".join([
            line,
            "STAND-IN MODE: this is NOT the paper's experiment and NOT VGG16 on ImageNet.",
            line,
            "A network with VGG16's 16 layers but 1/16 of its channels, random weights and a",
            "read-out fitted to tell the five shipped photographs apart (data/images/), on",
            f"{s.image_size}x{s.image_size} random crops of those photographs, on the CPU:",
            f"  patterns from {s.fit_images} crops; rho(S) on {s.quality_images} other crops "
            f"({s.quality_dense_images} for the dense layers);",
            f"  region perturbation ({s.patch}x{s.patch} regions, {s.perturbation_steps} steps) "
            f"on {s.perturbation_images} crops; figures on the five photographs.",
            "It runs in float64, so that its numbers are the same on every machine. Every step",
            "runs the same toolkit code as a full run; the numbers only show that the pipeline",
            "works. What a full run needs is printed below.",
            line,
        ])

    def describe(self) -> str:
        """What was found on this machine (paths: not for checked notebook output)."""
        lines = [f"mode: {self.mode}"]
        if self.is_full:
            lines.append(f"weights: {self.weights if self.weights != 'DEFAULT' else 'torchvision DEFAULT (torch cache)'}")
            lines.append(f"ImageNet: {self.imagenet}")
            if self.patterns is None:
                lines.append("patterns: fitted here and kept in memory (set TOOLKIT_PATTERNS=FILE to save them)")
            elif self.patterns.is_file():
                lines.append(f"patterns: read from {self.patterns}")
            else:
                lines.append(f"patterns: fitted here and saved to {self.patterns}")
            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
            lines.append(f"device: {self.device} ({name}); data-loading workers: {self.workers}")
            if self.device.type != "cuda":
                lines.append("WARNING: a full run on the CPU takes days; set TOOLKIT_DEVICE=cuda on a GPU machine")
        else:
            lines.append("a full run is missing: " + "; ".join(self.missing))
        return "\n".join(lines)

    def full_run_needs(self) -> str:
        """Environment variables, folder layout and the estimated time of a full run."""
        from toolkit.zoo import weights_url

        s = self.full_sizes
        times = estimate_seconds(s, self.rates)
        rows = [
            "A FULL RUN NEEDS",
            "  TOOLKIT_VGG16_WEIGHTS=/path/to/vgg16-397923af.pth   the pretrained VGG16 weights",
            f"      from {weights_url('vgg16')}",
            "      (or leave it unset and put the file into torch's cache,",
            "       $TORCH_HOME/hub/checkpoints/, by default ~/.cache/torch/hub/checkpoints/)",
            "  TOOLKIT_IMAGENET=/path/to/imagenet                   ImageNet (ILSVRC2012):",
            "      imagenet/train/n01440764/n01440764_10026.JPEG ...  1000 class folders (fitting)",
            "      imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG ...  or a flat val/ with",
            "      LOC_val_solution.csv or the devkit's ground truth (see toolkit/imagenet.py)",
            "  TOOLKIT_PATTERNS=/path/to/vgg16.patterns.safetensors (optional) patterns from",
            "      'toolkit fit' are read from it (then train/ may be absent: rho(S) is measured on",
            "      val/ instead); if the file does not exist, the fitted patterns are written there",
            "  one CUDA GPU with 32 GB or more (float64 statistics, the 25088 x 25088 moment of the",
            "      first dense layer and its eigendecomposition), 32 GB of RAM, 8+ CPU cores to decode",
            "      JPEGs, and 9 GB of disk next to TOOLKIT_PATTERNS (patterns with their statistics",
            "      5.0 GB, the fit's checkpoint 3.3 GB)",
            "",
            f"Estimated time on one GPU; rates {self.rates.source}:",
            f"  forward {self.rates.forward:,.0f} images/s, fitting {self.rates.fitting:,.0f}, "
            f"explanation {self.rates.explanation:,.0f}, quality moments {self.rates.quality:,.0f}",
        ]
        for step, seconds in times.items():
            rows.append(f"  {step:<22}{_duration(seconds):>10}")
        rows.append(f"  {'total':<22}{_duration(sum(times.values())):>10}"
                    "   (plus data loading if the CPUs cannot decode the JPEGs fast enough)")
        return "\n".join(rows)

    # -- the model -------------------------------------------------------------------
    def model_and_categories(self) -> tuple[nn.Module, list[str]]:
        """The network, in eval mode, and its class names.

        Full: the pretrained VGG16 in float32 on :attr:`device` (channels-last on a GPU) and
        ImageNet's 1000 categories. Stand-in: :func:`toolkit.models.stand_in_model` fitted
        to the crops of :meth:`fitting_data`, in :attr:`dtype` (float64), on the CPU, and
        the names of the photographs (:data:`toolkit.imagenet.PHOTOGRAPHS`).
        """
        if self.is_full:
            from toolkit.zoo import imagenet_categories, torchvision_model

            model = torchvision_model("vgg16", weights=self.weights, download=False).to(self.device)
            if self.device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            return model.eval(), imagenet_categories()
        images, labels = self._crops(self.sizes.fit_images, seed=1)
        return stand_in_model(images, labels), list(PHOTOGRAPHS)

    # -- data ------------------------------------------------------------------------
    def _preprocessing(self):
        from toolkit.imagenet import Preprocessing

        size = self.sizes.image_size
        return Preprocessing(resize=round(size * 256 / 224), crop=size)

    def _crops(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        return _cached_crops(n, self.sizes.image_size, seed, self.dtype)

    def _split(self, split: str):
        from toolkit.imagenet import imagenet

        return imagenet(self.imagenet, split, preprocessing=self._preprocessing())

    def _loader(self, dataset):
        from toolkit.imagenet import make_loader

        return make_loader(dataset, self.sizes.batch_size, workers=self.workers)

    def photographs(self) -> tuple[Tensor, list[str]]:
        """The five shipped photographs, preprocessed for the network: ``(5, 3, S, S)``.

        Full: :func:`toolkit.imagenet.read_images` (ImageNet's preprocessing). Stand-in:
        the same steps on float64 pixels (resizing ``uint8`` images rounds differently on
        different CPUs).
        """
        from toolkit.data import data_dir
        from toolkit.imagenet import read_images

        folder = data_dir() / "images"
        if self.is_full:
            images, names = read_images([folder / f"{n}.jpg" for n in PHOTOGRAPHS], self._preprocessing())
            return images.to(self.device, self.dtype), [Path(n).stem for n in names]
        from torchvision.transforms.v2 import functional as TF

        p = self._preprocessing()
        mean = torch.tensor(p.mean, dtype=self.dtype)[:, None, None]
        std = torch.tensor(p.std, dtype=self.dtype)[:, None, None]
        photos, names = load_photographs(folder)
        images = []
        for photo in photos:
            x = TF.resize(photo.to(self.dtype) / 255, p.resize, interpolation=TF.InterpolationMode.BILINEAR,
                          antialias=True)
            images.append((TF.center_crop(x, p.crop).clamp(0, 1) - mean) / std)
        return torch.stack(images), names

    def fitting_data(self):
        """Batches to fit the patterns on: training images (full) or crops (seed 1)."""
        if self.is_full:
            return self._loader(self._split("train").subset(self.sizes.fit_images))
        return torch.split(self._crops(self.sizes.fit_images, seed=1)[0], self.sizes.batch_size)

    def precision_data(self):
        """A few batches for the float64 reference fit: validation images or crops."""
        if self.is_full:
            return list(self._loader(self._split("val").subset(self.sizes.precision_images)))
        return torch.split(self._crops(self.sizes.precision_images, seed=4)[0], self.sizes.batch_size)

    def _held_out(self):
        """Training images the patterns are NOT fitted on (the paper fits on one half of
        the training set and measures rho(S) on the other); the validation images when
        there is no ``train/`` (patterns read from a file)."""
        from toolkit.imagenet import ImageFiles

        if not (self.imagenet / "train").is_dir():
            return self._split("val")
        train = self._split("train")
        fitted = set(train.subset(self.sizes.fit_images).files)
        rest = [i for i, f in enumerate(train.files) if f not in fitted]
        return ImageFiles([train.files[i] for i in rest], [train.labels[i] for i in rest],
                          train.classes, train.preprocessing)

    def quality_data(self, dense: bool = False):
        """Batches for rho(S): ``quality_images`` for the convolutions, or (``dense=True``)
        ``quality_dense_images`` for the dense layers, which see one sample per image.
        Full: held-out training images; stand-in: crops with seed 2."""
        n = self.sizes.quality_dense_images if dense else self.sizes.quality_images
        if not self.is_full:
            return torch.split(self._crops(n, seed=2)[0], self.sizes.batch_size)
        return self._loader(self._held_out().subset(n))

    def perturbation_set(self) -> tuple[Tensor, Tensor]:
        """Images and labels of the region-perturbation test (and the accuracy check):
        validation images (full) or crops with seed 3, as tensors on the device."""
        if not self.is_full:
            return self._crops(self.sizes.perturbation_images, seed=3)
        loader = self._loader(self._split("val").subset(self.sizes.perturbation_images))
        images, labels = zip(*loader)
        return torch.cat(images).to(self.device), torch.cat(labels)

    # -- fitting ---------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path | None:
        """Where a full fit saves its running sums (next to ``TOOLKIT_PATTERNS``), so that
        running the notebook again resumes an interrupted fit; None otherwise."""
        if not self.is_full or self.patterns is None:
            return None
        name = self.patterns.name.removesuffix(".safetensors")
        return self.patterns.with_name(f"{name}.checkpoint.safetensors")

    def fast_settings(self) -> dict:
        """The fast fitting settings, and the tolerance they must meet against float64.

        A float32 model and float32 products (the sums stay float64); on a GPU also TF32
        in cuBLAS/cuDNN (:func:`toolkit.precision.tf32`) and the model in channels-last
        (set by :meth:`model_and_categories`). ``tolerance`` bounds
        :func:`toolkit.precision.pattern_difference` from the float64 reference
        (tests/test_precision.py). ``use`` says whether the fit may use them once they
        pass: in a full run; never for the stand-in, which fits in float64 throughout.
        """
        gpu = self.device.type == "cuda"
        return {"compute_dtype": torch.float32, "tf32": gpu, "channels_last": gpu and self.is_full,
                "tolerance": TF32_TOLERANCE if gpu else FLOAT32_TOLERANCE, "use": self.is_full}

    def fast_model(self, model: nn.Module) -> nn.Module:
        """``model`` in float32: the model itself in a full run, a copy for the stand-in."""
        import copy

        return model if model_dtype(model) == torch.float32 else copy.deepcopy(model).float()

    def reference_model(self, model: nn.Module) -> nn.Module:
        """``model`` in float64, contiguous: a copy (the stand-in's model itself)."""
        import copy

        if model_dtype(model) == torch.float64 and not self.is_full:
            return model
        return copy.deepcopy(model).to(torch.float64, memory_format=torch.contiguous_format)

    def with_sizes(self, **changes) -> "Config":
        """A copy with some sizes changed (e.g. ``config.with_sizes(perturbation_images=200)``)."""
        return replace(self, sizes=replace(self.sizes, **changes))
