"""RepDistiller checkpoints: renamed exactly into the zoo, loaded by the real loader, refused when they do not fit.

RepDistiller's key names are written here as data, in its module order, independently of the converter
(which renames from our side). A RepDistiller-layout state is made by pairing those names with our
model's tensors in module order; converting it back must give every tensor its original key.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import Tensor

from itrd.cli.main import cli
from itrd.engine import Trainer, WeightsError
from itrd.engine.weights import load_weights_strict, read_state_dict
from itrd.models import create_model
from itrd.models.convert import REPDISTILLER_ARCHITECTURES, from_repdistiller, looks_like_repdistiller
from itrd.spec import JobSpec

CONV = ("weight",)
CONV_BIAS = LINEAR = ("weight", "bias")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
Modules = list[tuple[str, tuple[str, ...]]]

# RepDistiller's resnet8 (models/resnet.py), module by module.
RESNET8: Modules = [
    ("conv1", CONV), ("bn1", BN),
    ("layer1.0.conv1", CONV), ("layer1.0.bn1", BN), ("layer1.0.conv2", CONV), ("layer1.0.bn2", BN),
    ("layer2.0.conv1", CONV), ("layer2.0.bn1", BN), ("layer2.0.conv2", CONV), ("layer2.0.bn2", BN),
    ("layer2.0.downsample.0", CONV), ("layer2.0.downsample.1", BN),
    ("layer3.0.conv1", CONV), ("layer3.0.bn1", BN), ("layer3.0.conv2", CONV), ("layer3.0.bn2", BN),
    ("layer3.0.downsample.0", CONV), ("layer3.0.downsample.1", BN),
    ("fc", LINEAR),
]


def resnet(depths: tuple[int, ...], convs: int, projected: set[int], shortcut: str = "downsample",
           head: str = "fc") -> Modules:
    """resnet.py / resnetv2.py: conv1, bn1, layerN.B.{convK, bnK, <shortcut>.0/.1}, head; `projected` layers'
    first block has a shortcut projection."""
    mods: Modules = [("conv1", CONV), ("bn1", BN)]
    for layer, depth in enumerate(depths, 1):
        for b in range(depth):
            for k in range(1, convs + 1):
                mods += [(f"layer{layer}.{b}.conv{k}", CONV), (f"layer{layer}.{b}.bn{k}", BN)]
            if b == 0 and layer in projected:
                mods += [(f"layer{layer}.{b}.{shortcut}.0", CONV), (f"layer{layer}.{b}.{shortcut}.1", BN)]
    return [*mods, (head, LINEAR)]


def wrn(n: int, first_projected: bool) -> Modules:
    """wrn.py: conv1, blockG.layer.B.{bn1, conv1, bn2, conv2, convShortcut}, bn1, fc."""
    mods: Modules = [("conv1", CONV)]
    for group in (1, 2, 3):
        for b in range(n):
            p = f"block{group}.layer.{b}"
            mods += [(f"{p}.bn1", BN), (f"{p}.conv1", CONV), (f"{p}.bn2", BN), (f"{p}.conv2", CONV)]
            if b == 0 and (group > 1 or first_projected):
                mods.append((f"{p}.convShortcut", CONV))
    return [*mods, ("bn1", BN), ("fc", LINEAR)]


def vgg(convs: tuple[int, ...]) -> Modules:
    """vgg.py: blockS.{3j} conv (with bias), blockS.{3j+1} BN, then classifier."""
    mods: Modules = []
    for s, count in enumerate(convs):
        for j in range(count):
            mods += [(f"block{s}.{3 * j}", CONV_BIAS), (f"block{s}.{3 * j + 1}", BN)]
    return [*mods, ("classifier", LINEAR)]


def mobilenet_half() -> Modules:
    """mobilenetv2.py: conv1.0/.1, blocks.S.B.conv.{0,1,3,4,6,7}, conv2.0/.1, classifier.0."""
    mods: Modules = [("conv1.0", CONV), ("conv1.1", BN)]
    for s, depth in enumerate((1, 2, 3, 4, 3, 3, 1)):
        for b in range(depth):
            for i in (0, 3, 6):
                mods += [(f"blocks.{s}.{b}.conv.{i}", CONV), (f"blocks.{s}.{b}.conv.{i + 1}", BN)]
    return [*mods, ("conv2.0", CONV), ("conv2.1", BN), ("classifier.0", LINEAR)]


def shufflenet_v1() -> Modules:
    """ShuffleNetv1.py: conv1, bn1, layerN.B.{conv1..3, bn1..3}, linear."""
    mods: Modules = [("conv1", CONV), ("bn1", BN)]
    for layer, depth in enumerate((4, 8, 4), 1):
        for b in range(depth):
            for k in (1, 2, 3):
                mods += [(f"layer{layer}.{b}.conv{k}", CONV), (f"layer{layer}.{b}.bn{k}", BN)]
    return [*mods, ("linear", LINEAR)]


def shufflenet_v2() -> Modules:
    """ShuffleNetv2.py: a DownBlock (conv/bn 1-5) then basic blocks (1-3) per layer; conv2, bn2, linear."""
    mods: Modules = [("conv1", CONV), ("bn1", BN)]
    for layer, depth in enumerate((3, 7, 3), 1):
        for b in range(depth + 1):
            for k in range(1, 6 if b == 0 else 4):
                mods += [(f"layer{layer}.{b}.conv{k}", CONV), (f"layer{layer}.{b}.bn{k}", BN)]
    return [*mods, ("conv2", CONV), ("bn2", BN), ("linear", LINEAR)]


REPDISTILLER: dict[str, Modules] = {
    "resnet8": RESNET8,
    **{f"resnet{6 * n + 2}": resnet((n, n, n), 2, {2, 3}) for n in (2, 3, 5, 7, 9, 18)},
    "resnet8x4": resnet((1, 1, 1), 2, {1, 2, 3}),
    "resnet32x4": resnet((5, 5, 5), 2, {1, 2, 3}),
    "ResNet50": resnet((3, 4, 6, 3), 3, {1, 2, 3, 4}, shortcut="shortcut", head="linear"),
    "wrn_16_1": wrn(2, False),
    "wrn_16_2": wrn(2, True),
    "wrn_40_1": wrn(6, False),
    "wrn_40_2": wrn(6, True),
    "vgg8": vgg((1, 1, 1, 1, 1)),
    "vgg11": vgg((1, 1, 2, 2, 2)),
    "vgg13": vgg((2, 2, 2, 2, 2)),
    "vgg16": vgg((2, 2, 3, 3, 3)),
    "vgg19": vgg((2, 2, 4, 4, 4)),
    "MobileNetV2": mobilenet_half(),
    "mobile_half": mobilenet_half(),
    "ShuffleV1": shufflenet_v1(),
    "ShuffleV2": shufflenet_v2(),
}


def table_keys(architecture: str) -> list[str]:
    return [f"{name}.{leaf}" for name, leaves in REPDISTILLER[architecture] for leaf in leaves]


def distinct(model: torch.nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """Give every tensor of `model` its own random values (fresh batch norms are all alike), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                t.fill_(int(torch.randint(1, 10_000, (), generator=gen)))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.25)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5)
    return model.state_dict()


def as_repdistiller(architecture: str, num_classes: int = 10, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """One of our models with distinct weights, and the same tensors under RepDistiller's names."""
    model = create_model(architecture, num_classes)
    ours = distinct(model, seed)
    keys = table_keys(architecture)
    assert len(keys) == len(ours), f"the {architecture} table has {len(keys)} keys, the model {len(ours)}"
    return model.eval(), dict(zip(keys, ours.values(), strict=True))


def save_like_train_teacher(path: Path, model: torch.nn.Module, state: dict[str, Tensor]) -> Path:
    """A file laid out as RepDistiller's train_teacher.py saves ckpt_epoch_240.pth (keys shuffled)."""
    order = list(state)
    random.Random(0).shuffle(order)  # the converter must not depend on the file's key order
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    torch.save({"epoch": 240, "model": {k: state[k] for k in order}, "accuracy": torch.tensor(79.4),
                "optimizer": optimizer.state_dict()}, path)
    return path


def test_every_architecture_both_zoos_share_has_a_conversion() -> None:
    assert set(REPDISTILLER_ARCHITECTURES) == set(REPDISTILLER)


@pytest.mark.parametrize("architecture", sorted(REPDISTILLER))
def test_conversion_gives_every_tensor_its_own_key(architecture: str) -> None:
    model, theirs = as_repdistiller(architecture)
    assert looks_like_repdistiller(theirs, architecture)
    converted = from_repdistiller(theirs, architecture)
    original = model.state_dict()
    assert list(converted) == list(original)
    mismatched = [k for k in original if not torch.equal(converted[k], original[k])]
    assert not mismatched, mismatched[:5]


def test_a_repdistiller_checkpoint_file_loads_through_the_real_loader(tmp_path: Path) -> None:
    source, theirs = as_repdistiller("resnet8x4", num_classes=100)
    path = save_like_train_teacher(tmp_path / "ckpt_epoch_240.pth", source, theirs)
    model = create_model("resnet8x4", 100)
    load_weights_strict(model, read_state_dict(path), "resnet8x4", path.name)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = source(x), model.eval()(x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_missing_batch_norm_counters_start_at_zero() -> None:
    # Checkpoints from PyTorch before 0.4.1 have no num_batches_tracked; nothing else may be absent.
    _, theirs = as_repdistiller("wrn_16_1")
    old = {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}
    assert looks_like_repdistiller(old, "wrn_16_1")
    converted = from_repdistiller(old, "wrn_16_1")
    assert converted["final_bn.num_batches_tracked"].item() == 0
    load_weights_strict(create_model("wrn_16_1", 10), old, "wrn_16_1", "old.pth")


def test_a_checkpoint_of_another_architecture_is_refused_naming_it() -> None:
    _, resnet8 = as_repdistiller("resnet8")
    assert not looks_like_repdistiller(resnet8, "resnet8x4")  # resnet8x4 also projects in layer1
    with pytest.raises(WeightsError, match=r"do not fit architecture 'resnet8x4'.*missing key"):
        load_weights_strict(create_model("resnet8x4", 10), resnet8, "resnet8x4", "ckpt_epoch_240.pth")


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it() -> None:
    _, theirs = as_repdistiller("resnet8")
    theirs["layer1.0.conv2.weight"] = torch.zeros(16, 16, 1, 1)
    assert looks_like_repdistiller(theirs, "resnet8")  # the keys fit; the shapes are checked on conversion
    expected = r"layer1\.0\.conv2\.weight: file \(16, 16, 1, 1\) vs resnet8 \(16, 16, 3, 3\)"
    with pytest.raises(WeightsError, match=r"RepDistiller checkpoint of 'resnet8'.*1 shape mismatch.*" + expected):
        load_weights_strict(create_model("resnet8", 10), theirs, "resnet8", "ckpt_epoch_240.pth")


def test_a_partial_or_padded_checkpoint_is_refused_naming_the_key() -> None:
    _, theirs = as_repdistiller("resnet8")
    partial = {k: v for k, v in theirs.items() if k != "layer2.0.downsample.0.weight"}
    assert not looks_like_repdistiller(partial, "resnet8")
    with pytest.raises(WeightsError, match=r"'resnet8': 1 missing key.*layer2\.0\.downsample\.0\.weight"):
        from_repdistiller(partial, "resnet8")
    with pytest.raises(WeightsError, match=r"'resnet8': 1 unexpected key.*layer4\.0\.conv1\.weight"):
        from_repdistiller({**theirs, "layer4.0.conv1.weight": torch.zeros(1)}, "resnet8")


def test_a_converted_checkpoint_for_another_class_count_names_the_conversion() -> None:
    _, theirs = as_repdistiller("vgg8", num_classes=100)
    with pytest.raises(WeightsError, match=r"converted from RepDistiller's layout.*'vgg8'.*classifier\.weight"):
        load_weights_strict(create_model("vgg8", 10), theirs, "vgg8", "ckpt_epoch_240.pth")


def test_what_cannot_be_converted_says_why() -> None:
    model, theirs = as_repdistiller("resnet8")
    assert not looks_like_repdistiller(theirs, "resnet18")
    with pytest.raises(WeightsError, match=r"RepDistiller has no architecture 'resnet18'.*resnet8x4"):
        from_repdistiller(theirs, "resnet18")
    ours = model.state_dict()
    assert not looks_like_repdistiller(ours, "resnet8")
    with pytest.raises(WeightsError, match="already in itrd's layout"):
        from_repdistiller(ours, "resnet8")


def test_a_teacher_spec_naming_a_repdistiller_checkpoint_just_works(tmp_path: Path) -> None:
    source, theirs = as_repdistiller("resnet8", num_classes=10)  # digits has 10 classes
    path = save_like_train_teacher(tmp_path / "ckpt_epoch_240.pth", source, theirs)
    spec = JobSpec.model_validate({
        "dataset": {"name": "digits", "subset": 64}, "device": "cpu", "model": "resnet8",
        "teacher": {"architecture": "resnet8", "path": str(path)},
    })
    trainer = Trainer(spec, tmp_path / "run")
    assert trainer.teacher is not None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = source(x), trainer.teacher(x)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)  # batch norm folded: float rounding


def test_cli_convert_writes_safetensors_that_itrd_eval_loads(tmp_path: Path) -> None:
    source, theirs = as_repdistiller("resnet8", num_classes=10)
    path = save_like_train_teacher(tmp_path / "ckpt_epoch_240.pth", source, theirs)
    out = tmp_path / "shipped" / "resnet8.safetensors"
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(path), "--arch", "resnet8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["architecture"] == "resnet8"
        assert set(f.keys()) == set(source.state_dict())  # our layout: no conversion left for loaders
    converted = read_state_dict(out)
    assert all(torch.equal(converted[k], v) for k, v in source.state_dict().items())
    result = runner.invoke(cli, ["eval", str(out), "--arch", "resnet8", "--dataset", "digits", "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["architecture"] == "resnet8"


@pytest.mark.parametrize(
    ("arch", "out_name", "expected"),
    [
        ("resnet14", "a.safetensors", "not a RepDistiller checkpoint of 'resnet14'"),
        ("resnet18", "a.safetensors", "RepDistiller has no architecture 'resnet18'"),
        ("resnet8", "a.pt", "--out must name a .safetensors file"),
    ],
)
def test_cli_convert_refuses_bad_input_with_exit_code_2(tmp_path: Path, arch: str, out_name: str,
                                                        expected: str) -> None:
    source, theirs = as_repdistiller("resnet8")
    path = save_like_train_teacher(tmp_path / "ckpt_epoch_240.pth", source, theirs)
    result = CliRunner().invoke(cli, ["convert", str(path), "--arch", arch, "--out", str(tmp_path / out_name)])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / out_name).exists()


def test_cli_convert_refuses_a_file_that_would_run_code(tmp_path: Path) -> None:
    # RepDistiller's resnet8_last.pth also pickles its argparse options: loading them would run code.
    _, theirs = as_repdistiller("resnet8")
    path = tmp_path / "resnet8_last.pth"
    torch.save({"opt": argparse.Namespace(model="resnet8"), "model": theirs}, path)
    out = tmp_path / "a.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(path), "--arch", "resnet8", "--out", str(out)])
    assert result.exit_code == 2 and "cannot read resnet8_last.pth safely" in result.output, result.output
    assert not out.exists()
