"""The networks of the time-series and the architecture notebooks: the 1-D CNN against its
Conv2d twin, the Inception-, DenseNet- and MobileNetV2-like networks against their parts
computed one by one, and the shipped Fashion-MNIST weights against the accuracy their
scripts printed."""
import pytest
import torch
from torch import nn

from toolkit.architectures import (DenseBlock, InceptionBlock, InvertedResidual, SmallDenseNet,
                                   SmallInception, SmallMobileNetV2)
from toolkit.data import load_fashion_mnist
from toolkit.models import (FASHION_MODELS, TimeSeriesCNN, accuracy, load_fashion_model,
                            load_saved_model, save_model)

#: The module types the new families may use (the constructs the engine is extended to).
ALLOWED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d,
           nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)
FAMILIES = {"inception": SmallInception, "densenet": SmallDenseNet, "mobilenet": SmallMobileNetV2}


# ----------------------------------------------------------------------------------
# the 1-D CNN and its Conv2d twin
# ----------------------------------------------------------------------------------
def test_time_series_cnn_and_its_twin_compute_the_same_function():
    torch.manual_seed(0)
    net = TimeSeriesCNN().double().eval()
    twin = net.twin()
    assert isinstance(twin.features[0], nn.Conv2d) and twin.features[0].kernel_size == (1, 9)
    assert isinstance(twin.features[2], nn.MaxPool2d) and twin.features[2].kernel_size == (1, 4)
    assert isinstance(net.features[0], nn.Conv1d) and twin.config["dims"] == 2
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in twin.named_parameters()]
    x = torch.randn(7, 16, 128, dtype=torch.float64)
    assert twin.inputs(x).shape == (7, 16, 1, 128) and net.inputs(twin.inputs(x)).shape == (7, 16, 128)
    torch.testing.assert_close(twin(twin.inputs(x)), net(x), rtol=0, atol=1e-12)
    # float32 as well, and back again to the same weights
    net32 = TimeSeriesCNN(width=4)
    torch.testing.assert_close(net32.twin()(net32.twin().inputs(x)), net32(net32.inputs(x)), rtol=1e-5, atol=1e-6)
    back = net.twin().twin()
    for (name, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert not twin.training and net.twin().twin().config == net.config


def test_time_series_cnn_against_an_explicit_forward_pass():
    torch.manual_seed(1)
    net = TimeSeriesCNN(channels=3, times=16, num_classes=2, width=2, kernel=3, pool=2, hidden=4).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    conv1, conv2 = net.features[0], net.features[3]
    h = x
    for conv in (conv1, conv2):  # convolution by a loop over output positions, ReLU, pooling by 2
        padded = nn.functional.pad(h, (1, 1))
        out = torch.stack([torch.einsum("nck,ock->no", padded[:, :, t:t + 3], conv.weight) + conv.bias
                           for t in range(h.shape[2])], 2)
        h = out.clamp(min=0).reshape(out.shape[0], out.shape[1], -1, 2).amax(-1)
    dense1, dense2 = net.classifier[1], net.classifier[3]
    expected = dense2((dense1(h.reshape(2, -1))).clamp(min=0))
    torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-12)


def test_time_series_cnn_settings_and_files(tmp_path):
    with pytest.raises(ValueError, match="dims"):
        TimeSeriesCNN(dims=3)
    with pytest.raises(ValueError, match="odd"):
        TimeSeriesCNN(kernel=4)
    with pytest.raises(ValueError, match="divisible"):
        TimeSeriesCNN(times=100)
    with pytest.raises(ValueError, match=r"\(N, 16, 128\)"):
        TimeSeriesCNN().inputs(torch.zeros(2, 16, 2, 64))
    net = TimeSeriesCNN(width=4).twin()
    save_model(net, tmp_path / "t.safetensors")
    loaded, _ = load_saved_model(tmp_path / "t.safetensors")
    x = torch.randn(3, 16, 1, 128)
    assert loaded.config == net.config and torch.equal(loaded(x), net(x))


# ----------------------------------------------------------------------------------
# the families
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_families_use_only_the_engines_constructs(name):
    net = FAMILIES[name]()
    leaves = [m for m in net.modules() if not list(m.children())]
    assert all(isinstance(m, ALLOWED) for m in leaves), {type(m).__name__ for m in leaves}
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert 10_000 < sum(p.numel() for p in net.parameters()) < 100_000


def test_inception_block_concatenates_its_branches():
    torch.manual_seed(0)
    block = InceptionBlock(8, 4, 6, 3, 5).eval()
    x = torch.randn(2, 8, 10, 10)
    parts = [block.branch1(x), block.branch3(x), block.branch5(x),
             block.branch_pool[1](nn.functional.max_pool2d(x, 3, 1, 1))]
    assert [p.shape[1] for p in parts] == [4, 6, 3, 5] and block.outputs == 18
    torch.testing.assert_close(block(x), torch.cat(parts, 1), rtol=0, atol=0)


def test_dense_block_keeps_every_earlier_output():
    torch.manual_seed(0)
    block = DenseBlock(6, layers=3, growth=4, bottleneck=8).eval()
    x = torch.randn(2, 6, 5, 5)
    out = block(x)
    assert out.shape == (2, 6 + 3 * 4, 5, 5) and block.outputs == 18
    torch.testing.assert_close(out[:, :6], x, rtol=0, atol=0)
    first = block.layers[0](x)
    torch.testing.assert_close(out[:, 6:10], first, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 10:14], block.layers[1](torch.cat([x, first], 1)), rtol=0, atol=0)
    # pre-activation: each layer starts with BatchNorm, ReLU on its whole input
    layer = block.layers[2]
    assert layer.norm1.num_features == 14 and isinstance(layer.relu1, nn.ReLU)


def test_inverted_residual_adds_its_input_only_where_the_shape_is_kept():
    torch.manual_seed(0)
    keep, shrink = InvertedResidual(8, 8, 1, 4).eval(), InvertedResidual(8, 16, 2, 4).eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(keep(x), x + keep.conv(x), rtol=0, atol=0)
    assert shrink(x).shape == (2, 16, 3, 3) and not shrink.residual
    depthwise = keep.conv[1][0]
    assert depthwise.groups == depthwise.in_channels == 32 and depthwise.weight.shape == (32, 1, 3, 3)
    assert isinstance(keep.conv[0][2], nn.ReLU6) and len(keep.conv[2]) == 2  # a linear projection


def test_mobilenet_relu6_clips():
    net = SmallMobileNetV2()
    assert sum(isinstance(m, nn.ReLU6) for m in net.modules()) > 5
    assert not any(type(m) is nn.ReLU for m in net.modules())


# ----------------------------------------------------------------------------------
# the shipped weights
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", *FAMILIES])
def test_shipped_weights_reach_the_accuracy_their_script_printed(name, one_thread):
    model = load_fashion_model(name)
    assert not model.training
    assert model.metadata["test_images"] == "1000" and model.metadata["train_images"] == "6000"
    images, labels = load_fashion_mnist("test")
    measured = accuracy(model, images, labels)
    assert measured == pytest.approx(float(model.metadata["test_accuracy"]), abs=0.002)
    assert measured > 0.8
    if name in FAMILIES:
        assert type(model) is FAMILIES[name]


def test_shipped_weights_are_small():
    from toolkit.data import data_dir

    sizes = {name: (data_dir() / file).stat().st_size for name, (file, _) in FASHION_MODELS.items()}
    assert sum(sizes[name] for name in FAMILIES) < 1_000_000


def test_unknown_or_missing_model_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown Fashion-MNIST model 'vgg'"):
        load_fashion_model("vgg")
    monkeypatch.setenv("TOOLKIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train_fashion_family.py densenet"):
        load_fashion_model("densenet")
