"""Small CNNs (VGG-style, residual, VGG16's layout with few channels, a 1-D CNN for
multichannel recordings), their training, and the shipped Fashion-MNIST weights.

The network is deliberately tiny -- four 3x3 convolutions and two dense layers
-- so that fitting patterns and computing explanations take seconds on a
laptop CPU. It is built only from the layer types every method of the toolkit
understands: ``Conv2d``, ``Linear``, ``ReLU``, ``MaxPool2d``, ``AvgPool2d``,
``Flatten`` and ``Dropout``.

:class:`MiniVGG16` has VGG16's sixteen layers and layer names with a fraction of its
channels; :func:`stand_in_model` gives it random features and a read-out fitted in closed
form, the stand-in for the pretrained VGG16 that notebook 04 runs on when the weights or
ImageNet are missing.

:class:`TimeSeriesCNN` is the 1-D CNN of the time-series notebook, written with Conv1d or,
equivalently, with Conv2d kernels ``(1, k)`` (:meth:`TimeSeriesCNN.twin` converts). The
Inception-, DenseNet- and MobileNetV2-like networks are in :mod:`toolkit.architectures`;
:data:`FASHION_MODELS` lists every network with shipped Fashion-MNIST weights and
:func:`load_fashion_model` reads them.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .architectures import SmallDenseNet, SmallInception, SmallMobileNetV2
from .data import data_dir
from .imagenet import PHOTOGRAPHS

__all__ = [
    "SmallVGG",
    "SmallResNet",
    "MiniVGG16",
    "TimeSeriesCNN",
    "SmallInception",
    "SmallDenseNet",
    "SmallMobileNetV2",
    "train",
    "stand_in_model",
    "accuracy",
    "predict",
    "save_model",
    "load_saved_model",
    "load_fashion_cnn",
    "load_fashion_resnet",
    "load_fashion_model",
    "FASHION_CNN_FILE",
    "FASHION_RESNET_FILE",
    "FASHION_MODELS",
]

#: File name of the shipped Fashion-MNIST weights inside the data directory.
FASHION_CNN_FILE = "fashion_cnn.safetensors"
#: File name of the shipped Fashion-MNIST :class:`SmallResNet` weights.
FASHION_RESNET_FILE = "fashion_resnet.safetensors"
#: Every network with shipped Fashion-MNIST weights: name -> (weights file in the data
#: directory, the script that trains it). :func:`load_fashion_model` reads them.
FASHION_MODELS = {
    "cnn": (FASHION_CNN_FILE, "scripts/train_fashion_cnn.py"),
    "resnet": (FASHION_RESNET_FILE, "scripts/train_fashion_resnet.py"),
    "inception": ("fashion_inception.safetensors", "scripts/train_fashion_family.py inception"),
    "densenet": ("fashion_densenet.safetensors", "scripts/train_fashion_family.py densenet"),
    "mobilenet": ("fashion_mobilenet.safetensors", "scripts/train_fashion_family.py mobilenet"),
}


class SmallVGG(nn.Sequential):
    """A small VGG-style network for square images.

    Layout (``w = width``, ``s = image_size``)::

        features:   conv3x3(c -> w)  relu  conv3x3(w -> w)   relu  maxpool2
                    conv3x3(w -> 2w) relu  conv3x3(2w -> 2w) relu  maxpool2
        classifier: flatten  linear(2w * (s/4)^2 -> hidden)  relu  [dropout]
                    linear(hidden -> num_classes)

    All convolutions use padding 1, so only the two poolings shrink the image.
    The model is an ``nn.Sequential`` of two named parts, ``features`` and
    ``classifier``; iterating ``model.modules()`` visits the layers in forward
    order. The output is the vector of logits (no softmax).

    Parameters
    ----------
    in_channels : int, default 1
    num_classes : int, default 10
    image_size : int, default 28
        Height and width of the input; must be divisible by 4 (28 and 32 are).
    width : int, default 16
        Channels of the first two convolutions (the last two have twice as many).
    hidden : int, default 128
        Units of the hidden dense layer.
    dropout : float, default 0.0
        Dropout probability before the last layer (0 leaves the layer out).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        width: int = 16,
        hidden: int = 128,
        dropout: float = 0.0,
    ):
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, not {image_size}")
        w, side = width, image_size // 4
        features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        head = [nn.Flatten(), nn.Linear(2 * w * side * side, hidden), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_classes))
        super().__init__(OrderedDict(features=features, classifier=nn.Sequential(*head)))
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            width=width,
            hidden=hidden,
            dropout=dropout,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


class SmallResNet(nn.Module):
    """A small residual network for square grey-scale images (torchvision's BasicBlock).

    Layout (``w = width``)::

        stem:    conv3x3(c -> w) bn relu
        layer1:  BasicBlock(w -> w)
        layer2:  BasicBlock(w -> 2w, stride 2)   downsample: conv1x1 bn
        layer3:  BasicBlock(2w -> 4w, stride 2)  downsample: conv1x1 bn
        head:    global average pooling, flatten, linear(4w -> num_classes)

    Each block computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)``, with the
    identity replaced by the downsample branch where the shape changes -- exactly
    torchvision's :class:`~torchvision.models.resnet.BasicBlock`, so everything that
    works here works on torchvision's ResNets too. Width 16 has about 78,000
    parameters; a 28 x 28 image ends as a 7 x 7 map before the pooling.

    Parameters
    ----------
    in_channels : int, default 1
    num_classes : int, default 10
    width : int, default 16
        Channels of the stem and the first block (then ``2w`` and ``4w``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        w = width

        def block(inputs: int, outputs: int, stride: int) -> nn.Module:
            downsample = None
            if stride != 1 or inputs != outputs:
                downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                           nn.BatchNorm2d(outputs))
            return BasicBlock(inputs, outputs, stride, downsample)

        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = block(w, w, 1)
        self.layer2 = block(w, 2 * w, 2)
        self.layer3 = block(2 * w, 4 * w, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class MiniVGG16(nn.Module):
    """VGG16's sixteen layers with ``1/divisor`` of its channels, for small images.

    ``features`` is torchvision's VGG16 feature stack (13 convolutions 3x3, padding 1,
    ReLU, 5 max-poolings) with ``64/divisor ... 512/divisor`` channels, so its layers have
    VGG16's names (``features.0`` ... ``features.28``); then global average pooling and
    ``classifier`` = dense ``512/divisor -> hidden -> hidden -> classes`` with ReLU and
    Dropout between (``classifier.0``, ``.3``, ``.6``, as in VGG16). The default
    ``classes`` are the shipped photographs (:data:`toolkit.imagenet.PHOTOGRAPHS`).
    """

    def __init__(self, classes: int = len(PHOTOGRAPHS), divisor: int = 8, hidden: int = 64):
        super().__init__()
        from torchvision.models.vgg import make_layers

        config = [c if c == "M" else c // divisor for c in _VGG16_CONFIG]
        self.features = make_layers(config)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512 // divisor, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last layer (after the second dense layer's ReLU)."""
        return self.classifier[:5](torch.flatten(self.avgpool(self.features(x)), 1))


class TimeSeriesCNN(nn.Sequential):
    """A small 1-D CNN for multichannel recordings: convolutions over time, the recording's
    channels as input channels.

    Layout (``w = width``, ``k = kernel``, ``p = pool``, ``T = times``)::

        features:   conv(channels -> w, k) relu maxpool p
                    conv(w -> 2w, k)       relu maxpool p
        classifier: flatten linear(2w * T / p^2 -> hidden) relu linear(hidden -> num_classes)

    The convolutions pad ``k // 2`` on both sides, so only the poolings shorten the time
    axis. With ``dims=1`` the layers are ``Conv1d`` and ``MaxPool1d`` on inputs
    ``(N, channels, times)``; with ``dims=2`` the same network is written with ``Conv2d``
    kernels ``(1, k)`` and ``MaxPool2d`` windows ``(1, p)`` on inputs
    ``(N, channels, 1, times)``. The two compute the same function; :meth:`twin` turns one
    into the other with the weights copied, and :meth:`inputs` reshapes recordings for
    either. Layer names (``features.0``, ...) are the same in both.

    Parameters
    ----------
    channels : int, default 16
    times : int, default 128
        Must be divisible by ``pool ** 2``.
    num_classes : int, default 2
    width : int, default 8
    kernel : int, default 9
        Odd, so that the padding keeps the length.
    pool : int, default 4
    hidden : int, default 32
    dims : {1, 2}
    """

    def __init__(self, channels: int = 16, times: int = 128, num_classes: int = 2, width: int = 8,
                 kernel: int = 9, pool: int = 4, hidden: int = 32, dims: int = 1):
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 (Conv1d) or 2 (Conv2d with (1, k) kernels), not {dims!r}")
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, so that the padding keeps the length; got {kernel}")
        if times % pool ** 2:
            raise ValueError(f"times must be divisible by pool ** 2 = {pool ** 2}, not {times}")
        if dims == 1:
            def conv(i, o):
                return nn.Conv1d(i, o, kernel, padding=kernel // 2)
            pooling = nn.MaxPool1d(pool)
        else:
            def conv(i, o):
                return nn.Conv2d(i, o, (1, kernel), padding=(0, kernel // 2))
            pooling = nn.MaxPool2d((1, pool))
        w = width
        features = nn.Sequential(conv(channels, w), nn.ReLU(), pooling,
                                 conv(w, 2 * w), nn.ReLU(), pooling)
        classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (times // pool ** 2), hidden), nn.ReLU(),
                                   nn.Linear(hidden, num_classes))
        super().__init__(OrderedDict(features=features, classifier=classifier))
        self.config = dict(channels=channels, times=times, num_classes=num_classes, width=width,
                           kernel=kernel, pool=pool, hidden=hidden, dims=dims)

    def inputs(self, recordings) -> torch.Tensor:
        """Recordings ``(N, channels, times)`` or ``(N, channels, 1, times)`` (an array or a
        tensor) as this network's input, in its dtype: ``(N, channels, times)`` for
        ``dims=1``, ``(N, channels, 1, times)`` for ``dims=2``."""
        x = torch.as_tensor(recordings, dtype=self.features[0].weight.dtype)
        channels, times = self.config["channels"], self.config["times"]
        if x.dim() not in (3, 4) or x.shape[1] != channels or x.shape[-1] != times or x[0, 0].numel() != times:
            raise ValueError(f"recordings must be shaped (N, {channels}, {times}) or (N, {channels}, 1, "
                             f"{times}); got {tuple(x.shape)}")
        layout = (channels, times) if self.config["dims"] == 1 else (channels, 1, times)
        return x.reshape(len(x), *layout)

    def twin(self) -> "TimeSeriesCNN":
        """The same network written with the other convolution (Conv1d <-> Conv2d with
        ``(1, k)`` kernels), with the weights copied; in the dtype, on the device and in the
        mode (train/eval) of this one."""
        weight = self.features[0].weight
        other = TimeSeriesCNN(**(self.config | {"dims": 3 - self.config["dims"]}))
        other = other.to(device=weight.device, dtype=weight.dtype)
        target = other.state_dict()
        other.load_state_dict({name: value.detach().reshape(target[name].shape).clone()
                               for name, value in self.state_dict().items()})
        return other.train(self.training)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


#: The architectures :func:`load_saved_model` rebuilds, by the name :func:`save_model` stores.
ARCHITECTURES = {cls.__name__: cls for cls in (SmallVGG, SmallResNet, SmallInception, SmallDenseNet,
                                               SmallMobileNetV2, TimeSeriesCNN)}


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


def _batches(data, batch_size: int, shuffle: bool, generator=None):
    """Yield ``(inputs, labels)`` batches from tensors, a Dataset or a DataLoader.

    A pair of tensors is sliced directly (much faster than a DataLoader for
    data that fits in memory); a Dataset is wrapped in a DataLoader; a
    DataLoader is used as it is.
    """
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, DataLoader):
        yield from data
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, labels = data
        n = len(inputs)
        if shuffle:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            yield inputs[index], labels[index]
    elif isinstance(data, Dataset):
        yield from DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    else:
        raise TypeError(
            "data must be a pair (inputs, labels) of tensors, a torch Dataset or a "
            f"DataLoader, not {type(data).__name__}"
        )


def _num_batches(data, batch_size: int):
    from torch.utils.data import DataLoader

    try:
        if isinstance(data, DataLoader):
            return len(data)
        n = len(data[0]) if isinstance(data, (tuple, list)) else len(data)
        return -(-n // batch_size)
    except TypeError:  # an iterable dataset has no length
        return None


def train(
    model: nn.Module,
    data,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device=None,
    progress: bool = True,
):
    """Train a classifier with Adam on the cross-entropy loss.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of inputs to logits; trained in place.
    data : (inputs, labels) tensors, Dataset or DataLoader
        The training set. Tensors are shuffled every epoch by a generator
        seeded with ``seed``; so is a Dataset. A DataLoader keeps its own
        batching and shuffles with torch's global generator, which is seeded
        with ``seed`` for the duration of the call.
    epochs : int
    lr : float
        Adam learning rate.
    batch_size : int
        Ignored for a DataLoader.
    seed : int
        Seeds shuffling and dropout. Torch's global random state is saved
        and restored, so calling ``train`` does not disturb other code.
    device : str or torch.device, optional
        Where to train; defaults to the device of the model's parameters.
    progress : bool
        Show a tqdm progress bar per epoch.

    Returns
    -------
    model : torch.nn.Module
        The same model, trained and left in eval mode.
    history : dict
        ``"loss"`` and ``"accuracy"``: the mean training loss and accuracy per
        epoch (measured on the fly while the weights change); ``"batch_loss"``:
        every batch's loss.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters()).device
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    history = {"loss": [], "accuracy": [], "batch_loss": []}
    total_batches = _num_batches(data, batch_size)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            batches = _batches(data, batch_size, shuffle=True, generator=generator)
            bar = tqdm(
                batches,
                total=total_batches,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=not progress,
                leave=True,
            )
            for inputs, labels in bar:
                inputs, labels = inputs.to(device), labels.to(device)
                logits = model(inputs)
                loss = loss_fn(logits, labels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()

                batch_loss = loss.item()
                history["batch_loss"].append(batch_loss)
                loss_sum += batch_loss * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            history["loss"].append(loss_sum / max(seen, 1))
            history["accuracy"].append(correct / max(seen, 1))
    model.eval()
    return model, history


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` for ``images``, computed in eval mode in batches.

    The model's training/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        outputs = [
            model(images[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("no images given")
    return torch.cat(outputs)


def accuracy(model: nn.Module, images: torch.Tensor, labels, batch_size: int = 1000) -> float:
    """Fraction of ``images`` whose highest logit is the true label.

    Parameters
    ----------
    model : torch.nn.Module
    images : torch.Tensor, (N, C, H, W)
    labels : torch.Tensor or array, (N,)
    batch_size : int

    Returns
    -------
    float
    """
    predicted = predict(model, images, batch_size).argmax(1)
    labels = torch.as_tensor(labels).to(predicted.device)
    return (predicted == labels).float().mean().item()


def stand_in_model(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, divisor: int = 16,
                   hidden: int = 64, ridge: float = 1e-2, confidence: float = 10.0,
                   calibration: int = 128) -> MiniVGG16:
    """A :class:`MiniVGG16` with random features and a read-out fitted to ``images``.

    * Every Conv2d and Linear layer but the last gets He-normal weights
      (``N(0, 2 / fan_in)``, from a generator seeded with ``seed``).
    * Its bias is set, layer after layer, to minus the median of its output ``w^T x``
      over the first ``calibration`` images (all positions), so that every neuron is
      active on about half of the data -- as in a trained network, where almost no unit
      is always on or always off. The threshold lies halfway between the two middle
      values: a sample exactly on it would be active or not depending on round-off.
    * The last layer is fitted in closed form: ridge regression (float64; ``ridge``
      times the mean eigenvalue of the Gram matrix) of the one-hot labels on the
      penultimate activations of all ``images``, times ``confidence`` so that the
      softmax is decisive.

    No gradient descent, nothing to converge: the same weights on every machine up to
    float round-off. Notebook 04 fits it to crops of the shipped photographs
    (:func:`toolkit.imagenet.photo_crops`).

    Returns
    -------
    MiniVGG16 in the dtype of ``images``, eval mode
    """
    classes = int(labels.max()) + 1
    model = MiniVGG16(classes, divisor, hidden).to(images.dtype).eval()
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        x = images[:calibration]
        for module in [*model.features, model.avgpool, nn.Flatten(), *model.classifier[:5]]:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
                                    * math.sqrt(2 / fan_in))
                module.bias.zero_()
                y = module(x)
                values = y.movedim(1, -1).reshape(-1, y.shape[1]).sort(0).values
                middle = len(values) // 2  # halfway between two samples, never on one
                module.bias.copy_(-(values[middle - 1] + values[middle]) / 2)
            x = module(x)
        h = torch.cat([model.penultimate(x) for x in images.split(256)]).double()
        h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        targets = nn.functional.one_hot(labels, classes).double()
        gram = h1.T @ h1
        penalty = ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=h.dtype)
        penalty[-1, -1] = 0  # the bias is not penalised
        solution = torch.linalg.solve(gram + penalty, h1.T @ targets) * confidence
        last = model.classifier[6]
        last.weight.copy_(solution[:-1].T)
        last.bias.copy_(solution[-1])
    return model


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------


def save_model(model: SmallVGG, path, **metadata) -> None:
    """Save a :class:`SmallVGG`'s (or :class:`SmallResNet`'s) weights and configuration
    as safetensors.

    The configuration is stored as JSON under the metadata key ``"config"``, the
    class name under ``"architecture"``; further keyword arguments are stored as strings next to it (e.g.
    ``test_accuracy=0.91, epochs=5, seed=0``).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {k: str(v) for k, v in metadata.items()}
    info["config"] = json.dumps(model.config)
    info["architecture"] = type(model).__name__
    save_file(state, str(path), metadata=info)


def load_saved_model(path) -> tuple[SmallVGG, dict]:
    """Rebuild a :class:`SmallVGG` or :class:`SmallResNet` saved by :func:`save_model`
    (files without an ``"architecture"`` entry are SmallVGG).

    Returns
    -------
    model : SmallVGG
        In eval mode, on the CPU.
    metadata : dict of str
        Everything stored next to the weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    config = json.loads(metadata.get("config", "{}"))
    architecture = metadata.get("architecture", "SmallVGG")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path} holds a {architecture!r}; this toolkit rebuilds "
                         f"{', '.join(ARCHITECTURES)}")
    model = ARCHITECTURES[architecture](**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), metadata


def load_fashion_cnn(path=None) -> SmallVGG:
    """The :class:`SmallVGG` trained on all 60,000 Fashion-MNIST training images.

    It expects inputs scaled as :func:`toolkit.data.load_fashion_mnist` returns
    them (bytes / 255, in ``[0, 1]``). Its test accuracy and training settings
    are in ``model.metadata``.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Defaults to ``fashion_cnn.safetensors`` in :func:`toolkit.data.data_dir`
        (the repository's ``data/`` folder, or ``$TOOLKIT_DATA``).

    Returns
    -------
    SmallVGG
        In eval mode.
    """
    path = Path(path) if path is not None else data_dir() / FASHION_CNN_FILE
    if not path.exists():
        hint = (
            f" (TOOLKIT_DATA={os.environ['TOOLKIT_DATA']!r})" if os.environ.get("TOOLKIT_DATA") else ""
        )
        raise FileNotFoundError(
            f"Fashion-MNIST CNN weights not found at {path}{hint}. Rebuild them with "
            "'python scripts/train_fashion_cnn.py' (needs the Debian package "
            "dataset-fashion-mnist, or '--source torchvision ROOT'), or point the "
            "environment variable TOOLKIT_DATA at a folder holding "
            f"{FASHION_CNN_FILE}."
        )
    return _with_metadata(path)


def load_fashion_resnet(path=None) -> SmallResNet:
    """The :class:`SmallResNet` trained on the shipped Fashion-MNIST subset.

    Trained by ``scripts/train_fashion_resnet.py`` on the 6,000 training images of
    :func:`toolkit.data.load_fashion_mnist` (inputs scaled to ``[0, 1]``); its accuracy
    on the subset's 1,000 test images and the training settings are in
    ``model.metadata``.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Defaults to ``fashion_resnet.safetensors`` in :func:`toolkit.data.data_dir`.

    Returns
    -------
    SmallResNet
        In eval mode.
    """
    return load_fashion_model("resnet", path)


def _with_metadata(path: Path) -> nn.Module:
    """A saved model with its metadata (accuracy, training settings) as ``model.metadata``."""
    model, metadata = load_saved_model(path)
    model.metadata = metadata
    return model


def load_fashion_model(name: str, path=None) -> nn.Module:
    """A network of :data:`FASHION_MODELS` with its shipped Fashion-MNIST weights.

    ``"cnn"`` is :func:`load_fashion_cnn` (trained on all 60,000 training images), the
    others were trained on the 6,000 images of the shipped subset
    (:func:`toolkit.data.load_fashion_mnist`, inputs scaled to ``[0, 1]``) by the script
    :data:`FASHION_MODELS` names. The accuracy on the subset's 1,000 test images and the
    training settings are in ``model.metadata``.

    Parameters
    ----------
    name : {"cnn", "resnet", "inception", "densenet", "mobilenet"}
    path : str or os.PathLike, optional
        Defaults to the model's file in :func:`toolkit.data.data_dir`.

    Returns
    -------
    nn.Module
        In eval mode.
    """
    if name not in FASHION_MODELS:
        raise ValueError(f"unknown Fashion-MNIST model {name!r}; choose from {tuple(FASHION_MODELS)}")
    if name == "cnn":
        return load_fashion_cnn(path)
    file, script = FASHION_MODELS[name]
    path = Path(path) if path is not None else data_dir() / file
    if not path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST {name} weights not found at {path}. Rebuild them with "
            f"'python {script}', or point the environment variable TOOLKIT_DATA at a folder "
            f"holding {file}."
        )
    return _with_metadata(path)
