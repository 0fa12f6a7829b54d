"""Building models: torchvision's with weights from files or the cache, factories, saved
models. Nothing is downloaded: the "pretrained" weights are random ones saved here."""
import pytest
import torch
from torch import nn

from toolkit import zoo
from toolkit.layers import trace
from toolkit.models import SmallVGG, save_model


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A random AlexNet and its state dict saved with torch.save (a stand-in for the real weights)."""
    torch.manual_seed(0)
    model = zoo.torchvision_model("alexnet", weights=None)
    path = tmp_path_factory.mktemp("weights") / "alexnet-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_file_is_loaded(alexnet_file):
    model, path = alexnet_file
    loaded = zoo.torchvision_model("alexnet", weights=path)
    assert _same_parameters(model, loaded) and not loaded.training
    assert _same_parameters(model, zoo.load_model("alexnet", str(path)))


def test_cached_torchvision_weights_are_used_without_download(alexnet_file, tmp_path, monkeypatch):
    model, path = alexnet_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = zoo.weights_cache_path("alexnet")
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    assert cached.name == zoo.weights_url("alexnet").rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.symlink_to(path)
    assert _same_parameters(model, zoo.torchvision_model("alexnet", download=False))


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(zoo.WeightsNotFoundError) as caught:
        zoo.torchvision_model("vgg16", download=False)
    message = str(caught.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--weights FILE" in message and "--weights random" in message


def test_safetensors_and_wrapped_checkpoints(tmp_path):
    from safetensors.torch import save_file

    model = SmallVGG(width=4, hidden=8)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pt")
    for name in ("w.safetensors", "ddp.pt"):
        fresh = zoo.load_weights(SmallVGG(width=4, hidden=8), tmp_path / name)
        assert _same_parameters(model, fresh)


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    torch.save(SmallVGG(width=4).state_dict(), tmp_path / "w4.pt")
    with pytest.raises(ValueError, match="do not fit SmallVGG.*wrong shape: features.0.weight"):
        zoo.load_weights(SmallVGG(width=8), tmp_path / "w4.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        zoo.load_state_dict(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        zoo.load_state_dict(tmp_path / "missing.pt")


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="densenet121.*vgg16_bn|vgg16_bn.*densenet121"):
        zoo.load_model("efficientnet_b0")  # SiLU: not a ReLU-family classifier
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        zoo.torchvision_model("vgg16", weights="IMAGENET1K_V9")


def test_factories_and_saved_models(tmp_path):
    model = zoo.load_model("toolkit.models:SmallVGG", model_args='{"width": 4, "hidden": 8}')
    assert isinstance(model, SmallVGG) and model.config["width"] == 4 and not model.training
    save_model(model, tmp_path / "tiny.safetensors")
    assert _same_parameters(model, zoo.load_model(tmp_path / "tiny.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    again = zoo.load_model("toolkit.models:SmallVGG", tmp_path / "w.pt", model_args={"width": 4, "hidden": 8})
    assert _same_parameters(model, again)
    with pytest.raises(ValueError, match="no 'Nope'"):
        zoo.load_model("toolkit.models:Nope")
    with pytest.raises(ValueError, match="cannot call"):
        zoo.load_model("toolkit.models:SmallVGG", model_args={"depth": 3})
    with pytest.raises(ValueError, match="only for torchvision"):
        zoo.load_model("toolkit.models:SmallVGG", "IMAGENET1K_V1")


def test_torchvision_models_use_only_supported_layers(alexnet_file):
    model, _ = alexnet_file
    assert len(trace(model, torch.zeros(1, 3, 64, 64))) == 8
    vgg = zoo.torchvision_model("vgg11_bn", weights=None)
    plan = trace(vgg, torch.zeros(1, 3, 32, 32))
    assert len(plan) == 11 and all(layer.batchnorm is not None for layer in plan.layers[:8])


def test_imagenet_categories_need_no_download():
    categories = zoo.imagenet_categories()
    assert len(categories) == 1000 and categories[281] == "tabby"
