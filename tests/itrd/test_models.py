"""Tests for itrd.models: the CIFAR zoo against the reference shapes, the torchvision adapter, wrap_model."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.fx
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from itrd.models import (
    PooledClassifier,
    TorchvisionClassifier,
    create_model,
    model_family,
    model_names,
    register_model,
    wrap_model,
)
from itrd.models import registry as registry_module
from itrd.models import wrap as wrap_module
from itrd.models.resnet import Bottleneck, CifarResNet

# Exact parameter counts for num_classes=100 and feature sizes, obtained by instantiating the
# reference networks of HobbitLong/RepDistiller (models/*.py, vggN_bn for vggN, mobile_half for
# MobileNetV2). They agree with the rounded figures quoted for this CRD/RepDistiller zoo in the
# KD literature: WRN-40-2 2.26M, WRN-16-2 0.70M, WRN-40-1 0.57M, resnet56 0.86M, resnet110 1.74M,
# resnet20 0.28M, resnet32 0.47M, resnet32x4 7.43M, resnet8x4 1.23M, vgg13 9.46M, vgg8 3.96M,
# MobileNetV2 0.81M, ResNet50 23.71M, ShuffleNetV1 0.95M, ShuffleNetV2 1.36M.
REFERENCE = {
    # name: (parameters at num_classes=100, feature_dim, side of the last map before the pool at 32x32)
    "resnet8": (83_892, 64, 8),
    "resnet14": (181_108, 64, 8),
    "resnet20": (278_324, 64, 8),
    "resnet32": (472_756, 64, 8),
    "resnet44": (667_188, 64, 8),
    "resnet56": (861_620, 64, 8),
    "resnet110": (1_736_564, 64, 8),
    "resnet8x4": (1_233_540, 256, 8),
    "resnet32x4": (7_433_860, 256, 8),
    "wrn_16_1": (180_916, 64, 8),
    "wrn_16_2": (703_284, 128, 8),
    "wrn_40_1": (569_780, 64, 8),
    "wrn_40_2": (2_255_156, 128, 8),
    "vgg8": (3_965_028, 512, 4),
    "vgg11": (9_277_284, 512, 4),
    "vgg13": (9_462_180, 512, 4),
    "vgg16": (14_774_436, 512, 4),
    "vgg19": (20_086_692, 512, 4),
    "ResNet50": (23_705_252, 2048, 4),
    "MobileNetV2": (812_836, 1280, 2),
    "ShuffleV1": (949_258, 960, 4),
    "ShuffleV2": (1_355_528, 1024, 4),
}

# One model per block type; folding every model would only repeat these. ResNet50's bottleneck is
# covered by a tiny bottleneck network (see tiny_bottleneck_resnet) to keep the file fast.
FOLD_SUBSET = ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics, so that folding BN into convs is actually exercised."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def build_for_folding(name: str) -> nn.Module:
    if name == "tiny_bottleneck_resnet":
        return CifarResNet(Bottleneck, 8, (4, 8), (2, 2), num_classes=10)
    return create_model(name, 10)


def test_zoo_names_are_exactly_the_reference_zoo() -> None:
    zoo = {n for n in model_names() if not n.startswith("torchvision.")} - {"resnet18", "resnet34"}
    assert zoo == set(REFERENCE) | {"mobile_half"}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_parameter_count_matches_reference(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, 100)
    assert isinstance(model, PooledClassifier)
    params, feature_dim, _ = REFERENCE[name]
    assert n_params(model) == params
    assert model.feature_dim == feature_dim
    assert model.classifier.in_features == feature_dim


@pytest.mark.parametrize("name", list(REFERENCE))
def test_zoo_forward_returns_features_feeding_the_classifier(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 100)
    assert isinstance(model, PooledClassifier)
    _, feature_dim, side = REFERENCE[name]
    pooled_maps: list[torch.Size] = []
    model.get_submodule("pool").register_forward_hook(lambda _m, inputs, _out: pooled_maps.append(inputs[0].shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = model(x)
    # Where the reference down-samples (e.g. VGG skips its 4th max-pool at 32x32) shows up only here.
    assert pooled_maps == [torch.Size([2, feature_dim, side, side])]
    assert features.shape == (2, feature_dim)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()
    assert torch.equal(model.classifier(features), logits)
    # Traceability of every model; running and folding the trace is checked on FOLD_SUBSET.
    graph = torch.fx.symbolic_trace(model).graph
    assert any(node.op == "call_module" and node.target == "classifier" for node in graph.nodes)


@pytest.mark.parametrize("name", [*FOLD_SUBSET, "tiny_bottleneck_resnet", "resnet18"])
def test_fx_trace_and_batchnorm_folding_preserve_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = build_for_folding(name).eval()
    randomise_batchnorm(model)
    size = 64 if name == "resnet18" else 32
    x = torch.randn(2, 3, size, size)
    # The engine folds the frozen teacher exactly like this: trace, then fuse conv+BN pairs.
    fused = fuse(torch.fx.symbolic_trace(model))
    assert count_batchnorms(fused) < count_batchnorms(model)
    with torch.no_grad():
        features, logits = model(x)
        fused_features, fused_logits = fused(x)
    torch.testing.assert_close(fused_features, features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-4, atol=1e-4)


def test_mobile_half_is_the_paper_mobilenetv2() -> None:
    with torch.device("meta"):
        assert n_params(create_model("mobile_half", 100)) == REFERENCE["MobileNetV2"][0]


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("resnet20", "resnet"),
        ("resnet32x4", "resnet"),
        ("ResNet50", "resnet_bottleneck"),
        ("wrn_40_2", "wrn"),
        ("vgg13", "vgg"),
        ("MobileNetV2", "mobilenet"),
        ("ShuffleV1", "shufflenet"),
        ("ShuffleV2", "shufflenet"),
        ("resnet18", "resnet"),
        ("resnet34", "resnet"),
        ("torchvision.resnet50", "resnet_bottleneck"),
        ("torchvision.mobilenet_v3_small", "mobilenet"),
        ("torchvision.efficientnet_b0", "efficientnet"),
    ],
)
def test_model_family(name: str, family: str) -> None:
    assert model_family(name) == family


@pytest.mark.parametrize(("name", "params"), [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_imagenet_pair_matches_torchvision(name: str, params: int) -> None:
    model = create_model(name, 1000)
    assert isinstance(model, TorchvisionClassifier)
    assert n_params(model) == params
    assert model.feature_dim == 512
    # 64x64 keeps the test fast; the network is resolution-agnostic thanks to its adaptive pool.
    with torch.no_grad():
        features, logits = model.eval()(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 512)
    assert logits.shape == (2, 1000)
    assert torch.equal(model.classifier(features), logits)


def test_torchvision_adapter_keeps_the_original_outputs() -> None:
    # Same seed, same construction order: the adapter holds the very weights torchvision would create.
    torch.manual_seed(0)
    model = create_model("torchvision.mobilenet_v3_small", 7).eval()
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, logits = model(x)
        expected = reference(x)
    assert features.shape == (2, 1024)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "feature_dim"),
    [
        ("torchvision.resnet50", 2048),  # fc
        ("torchvision.densenet121", 1024),  # classifier is a Linear
        ("torchvision.efficientnet_b0", 1280),  # classifier is a Sequential ending in a Linear
        ("torchvision.convnext_tiny", 768),
        ("torchvision.swin_t", 768),  # head
        ("torchvision.vit_b_16", 768),  # heads.head
        ("torchvision.googlenet", 1024),
        ("torchvision.inception_v3", 2048),
    ],
)
def test_torchvision_heads_are_found(name: str, feature_dim: int) -> None:
    with torch.device("meta"):
        model = create_model(name, 10)
    assert isinstance(model, TorchvisionClassifier)
    assert model.feature_dim == feature_dim
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == 10
    assert not any(m is model.classifier for m in model.backbone.modules())


def test_torchvision_names_cover_linear_headed_classifiers_only() -> None:
    names = model_names()
    assert "torchvision.resnet50" in names
    assert "torchvision.vit_b_16" in names
    assert "torchvision.squeezenet1_0" not in names
    assert names.index("resnet8") < names.index("torchvision.alexnet")


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet9'") as info:
        create_model("resnet9", 10)
    assert "resnet8x4" in str(info.value)
    assert "torchvision.resnet50" in str(info.value)
    with pytest.raises(ValueError, match="known models"):
        model_family("resnet9")


@pytest.mark.parametrize("num_classes", [0, -3, True, 2.0])
def test_num_classes_must_be_a_positive_int(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet8", num_classes)  # type: ignore[arg-type]


class TinyNet(nn.Module):
    """A user model honouring the interface."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.feature_dim = 6
        self.body = nn.Sequential(nn.Flatten(1), nn.Linear(12, 6), nn.ReLU())
        self.classifier = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.classifier(features)


def test_register_model_adds_a_user_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_model("tiny", family="mlp")
    def tiny(num_classes: int) -> nn.Module:
        return TinyNet(num_classes)

    assert "tiny" in model_names()
    assert model_family("tiny") == "mlp"
    features, logits = create_model("tiny", 4)(torch.randn(3, 3, 2, 2))
    assert features.shape == (3, 6)
    assert logits.shape == (3, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny", family="mlp")(tiny)

    @register_model("no_dim", family="mlp")
    def no_dim(num_classes: int) -> nn.Module:
        return nn.Linear(4, num_classes)

    with pytest.raises(TypeError, match="feature_dim"):
        create_model("no_dim", 2)


def small_user_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(8, 3),
    )


def test_wrap_model_uses_the_named_submodule_output() -> None:
    torch.manual_seed(0)
    net = small_user_net()
    model = wrap_model(net, "2")
    assert model.feature_dim == 8  # inferred from the last Linear's input
    x = torch.randn(4, 3, 5, 5)
    features, logits = model(x)
    assert features.shape == (4, 8)
    torch.testing.assert_close(logits, net(x))
    torch.testing.assert_close(net[4](features), logits)
    # The hook lives only during the call.
    assert not net[2]._forward_hooks
    features.sum().backward()
    assert net[0].weight.grad is not None


def test_wrap_model_checks_names_and_dims() -> None:
    net = small_user_net()
    with pytest.raises(ValueError, match=r"no submodule 'pool'; submodules: 0, 1, 2, 3, 4"):
        wrap_model(net, "pool")
    with pytest.raises(ValueError, match="gives 8 features per sample, not feature_dim=5"):
        wrap_model(net, "3", feature_dim=5)(torch.randn(2, 3, 4, 4))
    assert wrap_model(net, "4").feature_dim == 3  # a Linear feature module gives its out_features
    with pytest.raises(ValueError, match="pass feature_dim"):
        wrap_model(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(1)), "0")


def test_wrap_model_docstring_example_runs() -> None:
    results = doctest.testmod(wrap_module, verbose=False)
    assert results.attempted > 0
    assert results.failed == 0
