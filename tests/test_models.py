"""Tests of toolkit.models: SmallVGG, the training loop, the shipped weights, the stand-in."""
import pytest
import torch
from torch import nn

from toolkit.data import load_fashion_mnist, make_ground_truth_images
from toolkit.models import (
    SmallVGG,
    accuracy,
    load_fashion_cnn,
    load_saved_model,
    predict,
    save_model,
    stand_in_model,
    train,
)

ALLOWED = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout)


@pytest.mark.parametrize("size, channels, classes", [(28, 1, 10), (32, 1, 2), (32, 3, 5)])
def test_forward_shapes(size, channels, classes):
    torch.manual_seed(0)
    model = SmallVGG(in_channels=channels, num_classes=classes, image_size=size)
    out = model(torch.rand(4, channels, size, size))
    assert out.shape == (4, classes)
    assert model.features(torch.rand(2, channels, size, size)).shape == (2, 32, size // 4, size // 4)


def test_only_supported_layers_in_forward_order():
    model = SmallVGG(dropout=0.5)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, ALLOWED) for m in leaves)
    kinds = [type(m).__name__ for m in leaves]
    assert kinds[:5] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d"]
    assert kinds[-5:] == ["Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert "Dropout" not in [type(m).__name__ for m in SmallVGG().modules()]


def test_image_size_must_be_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        SmallVGG(image_size=30)


def test_train_reduces_loss_and_is_seeded(one_thread):
    data = make_ground_truth_images(256, size=16, seed=0)
    inputs = (data.images, data.labels)

    def run():
        torch.manual_seed(0)
        model = SmallVGG(num_classes=2, image_size=16, width=4, hidden=16)
        before = nn.functional.cross_entropy(predict(model, data.images), data.labels).item()
        model, history = train(model, inputs, epochs=4, lr=1e-2, batch_size=32, seed=3, progress=False)
        after = nn.functional.cross_entropy(predict(model, data.images), data.labels).item()
        return model, history, before, after

    state = torch.random.get_rng_state()
    model, history, before, after = run()
    assert after < 0.5 * before
    assert history["loss"][-1] < history["loss"][0]
    assert len(history["batch_loss"]) == 4 * 8 and len(history["accuracy"]) == 4
    assert not model.training
    # the same seeds give the same weights
    model2, history2, _, _ = run()
    assert history2["loss"] == history["loss"]
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # train() restores torch's global random state (only the init above changed it)
    torch.random.set_rng_state(state)


def test_train_accepts_dataset_and_loader(one_thread):
    from torch.utils.data import DataLoader, TensorDataset

    data = make_ground_truth_images(64, size=8, seed=0)
    dataset = TensorDataset(data.images, data.labels)
    for source in (dataset, DataLoader(dataset, batch_size=16, shuffle=True)):
        model = SmallVGG(num_classes=2, image_size=8, width=2, hidden=4)
        _, history = train(model, source, epochs=1, batch_size=16, progress=False)
        assert len(history["batch_loss"]) == 4
    with pytest.raises(TypeError, match="pair"):
        train(SmallVGG(), "not data", epochs=1, progress=False)


def test_accuracy_counts_correct_predictions():
    model = SmallVGG(num_classes=3, image_size=8, width=2, hidden=4)
    images = torch.rand(10, 1, 8, 8)
    predicted = predict(model, images, batch_size=3).argmax(1)
    assert accuracy(model, images, predicted, batch_size=4) == 1.0
    wrong = (predicted + 1) % 3
    assert accuracy(model, images, wrong) == 0.0


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = SmallVGG(num_classes=2, image_size=32, width=4, dropout=0.2).eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path, test_accuracy=0.5, seed=1)
    loaded, metadata = load_saved_model(path)
    assert metadata["test_accuracy"] == "0.5" and metadata["seed"] == "1"
    assert loaded.config == model.config and not loaded.training
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_shipped_fashion_cnn_accuracy():
    model = load_fashion_cnn()
    assert isinstance(model, SmallVGG) and not model.training
    assert float(model.metadata["test_accuracy"]) >= 0.90  # on all 10,000 test images
    images, labels = load_fashion_mnist("test")
    assert accuracy(model, images, labels) >= 0.89  # measured: 0.905 on the shipped 1,000


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_cnn()
    message = str(info.value)
    assert str(tmp_path) in message
    assert "scripts/train_fashion_cnn.py" in message and "TOOLKIT_DATA" in message


def test_stand_in_model_tells_the_photographs_apart():
    from toolkit.imagenet import load_photographs, photo_crops

    photos, _ = load_photographs()
    images, labels = photo_crops(photos, 100, 32, seed=1)
    model = stand_in_model(images, labels, calibration=50)
    again = stand_in_model(images, labels, calibration=50)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
    assert [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == \
        [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)] + \
        [f"classifier.{i}" for i in (0, 3, 6)]  # VGG16's layer names
    test, test_labels = photo_crops(photos, 50, 32, seed=2)
    with torch.no_grad():
        train_accuracy = (model(images).argmax(1) == labels).float().mean()
        test_accuracy = (model(test).argmax(1) == test_labels).float().mean()
    assert train_accuracy > 0.9 and test_accuracy > 0.5
