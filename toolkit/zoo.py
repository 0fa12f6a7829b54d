"""Real image classifiers: torchvision's piecewise-linear classifiers, and weights from local files.

The paper explains VGG16 trained on ImageNet. This module builds that network and every
other torchvision classifier built only from neuron layers, ReLU-family activations,
pooling and linear operations (:data:`TORCHVISION_FAMILIES`: 43 of torchvision's 80
classifiers, from AlexNet and the VGGs to DenseNet, Inception, MobileNetV2, ShuffleNetV2
and RegNet-X) with one of three kinds of weights:

* ``weights="DEFAULT"`` (or a weight name such as ``"IMAGENET1K_V1"``): torchvision's
  pretrained ImageNet weights. They are read from torch's download cache
  (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``) and,
  when they are not there, downloaded into it once. With ``download=False`` -- or on a
  machine without internet -- a missing file is a :class:`WeightsNotFoundError` whose
  message gives the URL to fetch and the place to put it.
* ``weights=PATH``: a local file, either a state dict written by
  ``torch.save(model.state_dict(), PATH)`` (read with ``torch.load(weights_only=True)``,
  so it runs no code) or a safetensors file.
* ``weights=None``: random weights, for tests and benchmarks.

:func:`load_model` adds the two other ways the command line names a model: a factory
``"package.module:function"`` (for instance ``"toolkit.models:SmallVGG"``) and a model
file written by :func:`toolkit.models.save_model`.
"""
from __future__ import annotations

import json
import os
from importlib import import_module
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "TORCHVISION_MODELS",
    "TORCHVISION_FAMILIES",
    "input_preprocessing",
    "WeightsNotFoundError",
    "torchvision_model",
    "weights_url",
    "weights_cache_path",
    "load_state_dict",
    "load_weights",
    "load_model",
    "imagenet_categories",
]

#: The torchvision classifiers built only from what the toolkit supports, by family.
#: The other 37 classifiers of torchvision 0.29 use SiLU, Hardswish, GELU, LayerNorm,
#: attention or sigmoid gates, which the explanation rules do not cover (README).
TORCHVISION_FAMILIES = {
    "AlexNet": ("alexnet",),
    "VGG": ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"),
    "ResNet": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    "Wide ResNet": ("wide_resnet50_2", "wide_resnet101_2"),
    "ResNeXt": ("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"),
    "RegNet-X": ("regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
                 "regnet_x_16gf", "regnet_x_32gf"),
    "DenseNet": ("densenet121", "densenet161", "densenet169", "densenet201"),
    "GoogLeNet": ("googlenet",),
    "Inception": ("inception_v3",),
    "MobileNetV2": ("mobilenet_v2",),
    "MNASNet": ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    "ShuffleNetV2": ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
    "SqueezeNet": ("squeezenet1_0", "squeezenet1_1"),
}
#: Every supported torchvision classifier, by name.
TORCHVISION_MODELS = tuple(name for names in TORCHVISION_FAMILIES.values() for name in names)
#: Models whose pretrained weights expect the input normalised to [-1, 1] (torchvision
#: builds them with ``transform_input=True``, an offset inside the model; the toolkit
#: builds them without it and normalises the input that way instead: the same network).
_HALF_NORMALISED = ("googlenet", "inception_v3")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither in torch's cache nor could they be downloaded."""


# ----------------------------------------------------------------------------------
# torchvision's named weights
# ----------------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if name not in TORCHVISION_MODELS:
        raise ValueError(
            f"unknown model '{name}'; the torchvision models are {', '.join(TORCHVISION_MODELS)} "
            "(or give a factory 'package.module:function' or a model file)"
        )


def _weights_enum(name: str, weights: str):
    """torchvision's weight entry ``weights`` (e.g. "DEFAULT", "IMAGENET1K_V1") of ``name``."""
    from torchvision.models import get_model_weights

    _check_name(name)
    entries = get_model_weights(name)
    try:
        return entries[weights]
    except KeyError:
        raise ValueError(
            f"model '{name}' has no weights named '{weights}'; choose one of "
            f"{', '.join(entries.__members__)}, a weights file, or None for random weights"
        ) from None


def weights_url(name: str, weights: str = "DEFAULT") -> str:
    """The URL torchvision downloads the weights ``weights`` of model ``name`` from."""
    return _weights_enum(name, weights).url


def weights_cache_path(name: str, weights: str = "DEFAULT") -> Path:
    """Where torch keeps the downloaded weights: ``torch.hub.get_dir()/checkpoints/FILE``.

    ``torch.hub.get_dir()`` is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``).
    """
    url = weights_url(name, weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _missing_weights(name: str, weights: str, reason: str) -> WeightsNotFoundError:
    url = weights_url(name, weights)
    cache = weights_cache_path(name, weights)
    return WeightsNotFoundError(
        f"the pretrained weights of {name} ({weights}) are not available: {reason}. "
        f"Download {url} and save it as {cache} (torch's cache; set TORCH_HOME to move it), "
        f"or pass the file directly (--weights FILE, or weights=FILE), "
        f"or use random weights (--weights random, or weights=None)"
    )


def torchvision_model(name: str, weights: str | os.PathLike | None = "DEFAULT", *,
                      download: bool = True, progress: bool = True) -> nn.Module:
    """Build a torchvision VGG, AlexNet or ResNet, in eval mode, on the CPU.

    Parameters
    ----------
    name : str
        One of :data:`TORCHVISION_MODELS`.
    weights : str, path or None
        ``"DEFAULT"`` or another torchvision weight name of the model: the pretrained
        weights (from torch's cache, downloaded if missing and ``download``);
        a path: a state dict file (``torch.save``) or a safetensors file;
        ``None``: random weights.
    download : bool
        May missing pretrained weights be downloaded? Tests pass False.
    progress : bool
        Show a progress bar while downloading.

    Returns
    -------
    nn.Module

    Raises
    ------
    WeightsNotFoundError
        The pretrained weights are not cached and may not or could not be downloaded;
        the message says where to get them.
    ValueError
        For an unknown model or weight name, or a weights file that does not fit.
    """
    from torchvision.models import get_model

    _check_name(name)
    if weights is None:
        return get_model(name, weights=None).eval()
    if not _is_weight_name(name, weights):
        state, source = load_state_dict(weights), str(weights)
    else:
        entry = _weights_enum(name, str(weights))
        cached = weights_cache_path(name, str(weights))
        source = str(cached)
        if cached.exists():
            state = load_state_dict(cached)
        elif not download:
            raise _missing_weights(name, str(weights), f"{cached} does not exist and downloading is off")
        else:
            try:
                state = entry.get_state_dict(progress=progress, check_hash=True)
            except (OSError, RuntimeError) as error:  # no network, HTTP error, bad hash
                raise _missing_weights(name, str(weights), f"the download failed ({error})") from error
    model = get_model(name, weights=None)
    _load_into(model, state, source)
    return model.eval()


def _is_weight_name(name: str, weights) -> bool:
    """Is ``weights`` a torchvision weight name (rather than a file)?"""
    if not isinstance(weights, str) or Path(weights).exists():
        return False
    from torchvision.models import get_model_weights

    return weights in get_model_weights(name).__members__ or weights.isupper()


def input_preprocessing(name: str) -> dict:
    """How the torchvision model ``name`` wants its images: ``resize`` (shorter side),
    ``crop``, ``mean`` and ``std``, from torchvision's weights entry (Inception v3 takes
    299 x 299 crops); GoogLeNet and Inception v3, built here without their internal
    input transform, take images normalised to [-1, 1] (mean and std 0.5)."""
    from torchvision.models import get_model_weights

    _check_name(name)
    transforms = get_model_weights(name).DEFAULT.transforms()
    half = name in _HALF_NORMALISED
    return {"resize": int(transforms.resize_size[0]), "crop": int(transforms.crop_size[0]),
            "mean": (0.5, 0.5, 0.5) if half else tuple(transforms.mean),
            "std": (0.5, 0.5, 0.5) if half else tuple(transforms.std)}


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in the order of the models' outputs (no download)."""
    from torchvision.models import get_model_weights

    return list(get_model_weights("vgg16").DEFAULT.meta["categories"])


# ----------------------------------------------------------------------------------
# weights files
# ----------------------------------------------------------------------------------
def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a ``torch.save`` file or a safetensors file, on the CPU.

    A ``torch.save`` file is read with ``weights_only=True``: it may hold tensors and
    plain containers, never code. A checkpoint that wraps the state dict as
    ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, and the ``"module."``
    prefix of a model saved from ``DistributedDataParallel`` is removed.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file cannot be read or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors errors differ by version
        raise ValueError(
            f"cannot read weights from {path}: {error}. Give a state dict saved with "
            "torch.save(model.state_dict(), FILE) or a safetensors file"
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a dict of parameter name -> tensor)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_into(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``model.load_state_dict(state)``, with a readable error when they do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        detail = "; ".join(parts) or str(error).splitlines()[0]
        raise ValueError(
            f"the weights in {source} do not fit {type(model).__name__} ({detail})"
        ) from error


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict file (see :func:`load_state_dict`) into ``model``; return it.

    Raises
    ------
    FileNotFoundError, ValueError
        For a missing file, or weights whose names or shapes do not fit the model.
    """
    _load_into(model, load_state_dict(path), str(path))
    return model


# ----------------------------------------------------------------------------------
# one entry point for every way of naming a model
# ----------------------------------------------------------------------------------
def _factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    try:
        module = import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import '{module_name}' of the model factory '{spec}': {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"module '{module_name}' has no '{attribute}' (model factory '{spec}')") from None


def load_model(spec: str | os.PathLike, weights: str | os.PathLike | None = "DEFAULT", *,
               model_args: dict | str | None = None, download: bool = True,
               progress: bool = True) -> nn.Module:
    """Build the model named by ``spec``, in eval mode, on the CPU.

    Parameters
    ----------
    spec : str or path
        One of three things:

        * a torchvision model, ``"vgg16"`` etc. (:data:`TORCHVISION_MODELS`);
        * a factory ``"package.module:function"``, called with ``model_args`` as
          keyword arguments, for example ``"toolkit.models:SmallVGG"`` or
          ``"toolkit.models:load_fashion_cnn"``;
        * a ``.safetensors`` model file written by :func:`toolkit.models.save_model`.
    weights : str, path or None
        For a torchvision model, as in :func:`torchvision_model` (``"DEFAULT"``: the
        pretrained weights, ``None``: random). For a factory or a model file,
        ``"DEFAULT"`` (or ``None`` for a factory) keeps the weights the model comes with
        and a path loads a state dict file into it.
    model_args : dict or JSON str, optional
        Keyword arguments of the factory.
    download, progress : bool
        See :func:`torchvision_model`.

    Returns
    -------
    nn.Module
    """
    spec = str(spec)
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args)
        except json.JSONDecodeError as error:
            raise ValueError(f"model arguments must be a JSON object, e.g. '{{\"width\": 8}}': {error}") from None
    if model_args is not None and not isinstance(model_args, dict):
        raise ValueError(f"model arguments must be a JSON object, not {model_args!r}")

    if spec in TORCHVISION_MODELS:
        if model_args:
            raise ValueError("model arguments are for a factory 'module:function', not for torchvision models")
        return torchvision_model(spec, weights, download=download, progress=progress)

    path = Path(spec)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        if weights is None:
            raise ValueError(f"{path} brings its own weights; weights=None (random) is for torchvision models")
        from toolkit.models import load_saved_model

        model, _ = load_saved_model(path)
    elif ":" in spec:
        factory = _factory(spec)
        try:
            model = factory(**(model_args or {}))
        except TypeError as error:
            raise ValueError(f"cannot call the model factory '{spec}' with {model_args or {}}: {error}") from error
        if not isinstance(model, nn.Module):
            raise ValueError(f"the model factory '{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        _check_name(spec)  # raises the error that lists every form

    if weights not in (None, "DEFAULT"):
        if isinstance(weights, str) and not Path(weights).exists() and weights.isupper():
            raise ValueError(f"named weights ('{weights}') exist only for torchvision models; give a file")
        load_weights(model, weights)
    return model.eval()
