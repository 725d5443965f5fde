from __future__ import annotations

import builtins
import copy
import pickle
import sys

import pytest
import torch
from torch import nn

from kdarena import models
from kdarena.models import registry

ALL = [
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn16_2", "wrn40_2", "wrn28_10", "mobilenetv2", "shufflenetv2", "vgg8", "vgg11", "vgg13", "convnet",
]
BIG = {"wrn28_10", "resnet110"}  # built everywhere, forwarded only at 32x32 to keep the file fast
FAST = ["convnet", "resnet20", "resnet8x4", "wrn16_2", "mobilenetv2", "shufflenetv2", "vgg8"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def test_available_lists_the_zoo():
    names = models.available()
    assert names == sorted(names)
    assert set(ALL) <= set(names)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_classes,in_channels", [(10, 1), (100, 3)])
def test_build_and_forward(name, num_classes, in_channels):
    torch.manual_seed(0)
    model = models.create(name, num_classes=num_classes, in_channels=in_channels)
    assert isinstance(model.feature_layer, str)
    assert models.feature_layer(model) == model.feature_layer
    model.eval()
    sizes = [32] if name in BIG else [28, 32]
    with torch.no_grad():
        for s in sizes:
            out = model(torch.randn(2, in_channels, s, s))
            assert out.shape == (2, num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in ALL if n not in BIG])
def test_smallest_input_8x8(name):
    model = models.create(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "name,published",
    [
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet44", 0.66e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
        ("wrn16_2", 0.70e6),
        ("wrn40_2", 2.2e6),
        ("wrn28_10", 36.5e6),
    ],
)
def test_parameter_counts_cifar10(name, published):
    # He et al. 2016 (Table 6) and Zagoruyko & Komodakis 2016 / RepDistiller (WRN-16-2), CIFAR-10
    count = n_params(models.create(name, num_classes=10))
    assert abs(count - published) / published < 0.03, count


@pytest.mark.parametrize("name,published", [("resnet8x4", 1.23e6), ("resnet32x4", 7.43e6), ("vgg8", 3.96e6)])
def test_parameter_counts_repdistiller_cifar100(name, published):
    count = n_params(models.create(name, num_classes=100))
    assert abs(count - published) / published < 0.03, count


def test_option_a_shortcuts_have_no_parameters():
    model = models.create("resnet20", 10)
    assert not any("shortcut" in n for n, _ in model.named_parameters())
    assert n_params(model) == 269_722


@pytest.mark.parametrize("name", ALL)
def test_feature_layer_hook_sees_classifier_input(name):
    model = models.create(name, num_classes=7, in_channels=3).eval()
    layer = dict(model.named_modules())[models.feature_layer(model)]
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    handle.remove()
    assert len(seen) == 1
    feat = seen[0]
    fc = last_linear(model)
    assert feat.shape == (3, fc.in_features)


@pytest.mark.parametrize("name", FAST)
def test_feature_is_classifier_input_exactly(name):
    model = models.create(name, num_classes=5, in_channels=2).eval()
    layer = dict(model.named_modules())[model.feature_layer]
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 2, 12, 12)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(last_linear(model)(seen[0]), logits)


@pytest.mark.parametrize("name", FAST)
def test_channels_last_and_bf16_autocast(name):
    model = models.create(name, num_classes=10, in_channels=3)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    out = model(x)  # train mode
    out.float().sum().backward()
    assert out.shape == (2, 10)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_train_step_backward_reaches_every_parameter():
    model = models.create("resnet20", 10, in_channels=1)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_weight_init():
    model = models.create("resnet20", 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    conv = model.conv1
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5  # kaiming normal, fan_out
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.2


def test_models_are_deepcopyable_and_picklable():
    model = models.create("convnet", 10)
    clone = copy.deepcopy(model)
    assert clone.feature_layer == "pool"
    pickle.loads(pickle.dumps(model))


def test_wrn_dropout_kwarg():
    model = models.create("wrn16_2", 10, dropout=0.3)
    assert model.block1[0].dropout == 0.3


def test_unknown_name():
    with pytest.raises(ValueError) as info:
        models.create("foo", 10)
    msg = str(info.value)
    assert msg.startswith("unknown model 'foo'; available: ")
    assert "resnet20" in msg and "'timm:NAME' for any timm model" in msg


def test_register_custom_model_and_duplicate():
    name = "test_models_custom_net"

    @models.register(name)
    def custom(num_classes: int, in_channels: int = 3) -> nn.Module:
        net = nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        net.feature_layer = "2"
        return net

    try:
        assert name in models.available()
        net = models.create(name, 3, in_channels=1)
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)
        assert models.feature_layer(net) == "2"
        with pytest.raises(ValueError, match="already registered"):
            models.register(name)(custom)
        with pytest.raises(ValueError, match="already registered"):
            models.register("resnet20")(custom)
    finally:
        registry._REGISTRY.pop(name, None)


def test_feature_layer_missing():
    with pytest.raises(ValueError, match="feature_layer"):
        models.feature_layer(nn.Linear(3, 2))


def test_timm_missing(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError) as info:
        models.create("timm:resnet18", 10)
    assert str(info.value) == "timm is not installed: pip install 'kdarena[timm]'"


def test_attach_feature_layer_generic():
    # the mechanism used for timm models, exercised on a plain model (timm is optional)
    from kdarena.models.timm_models import attach_feature_layer

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    keys = set(net.state_dict())
    assert attach_feature_layer(net, "3") == "3.pre_logits" == models.feature_layer(net)
    assert set(net.state_dict()) == keys
    for model in (net, copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        seen = []
        model.get_submodule("3.pre_logits").register_forward_hook(lambda m, i, o: seen.append(o))
        x = torch.randn(2, 1, 8, 8)
        out = model(x)
        assert seen[0].shape == (2, 4)
        torch.testing.assert_close(out, nn.functional.linear(seen[0], model[3].weight, model[3].bias))


def test_timm_model():
    pytest.importorskip("timm")
    model = models.create("timm:resnet18", num_classes=10, in_channels=1).eval()
    layer = dict(model.named_modules())[models.feature_layer(model)]
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10)
    assert seen[0].shape == (2, model.get_classifier().in_features)
    # attaching the hookable layer must not change the state dict
    import timm

    ref = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    assert set(ref.state_dict()) == set(model.state_dict())
