"""Reading the CIFAR teachers released with RepDistiller (CRD), whose key names differ from ours.

RepDistiller's networks and the zoo here compute the same functions with the same tensors, but name
them differently (``layer1.0.bn1.weight`` there is ``stages.0.0.conv1.1.weight`` here). For each family
a few rules rename our keys to RepDistiller's; a conversion then looks every tensor up by that name,
never by its position in the file: key order is not part of a checkpoint's format (a re-saved file may
list keys in another order), and the blocks of one stage share every shape, so shapes alone cannot tell
them apart. A state converts only if its keys and ours correspond one to one, shape for shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
from torch import Tensor

from itrd.engine.weights import WeightsError, misfit_report

from .registry import create_model
from .vgg import _POOLED_STAGES, _STAGES

_LEAF = r"\.(?P<leaf>\w+)$"
_CONV_BN = ("conv", "bn")  # our conv_bn(...) holds the conv at index 0 and its batch norm at index 1
# Batch-norm step counters: checkpoints from PyTorch < 0.4.1 lack them, and they only matter for
# cumulative averaging (momentum=None), which no model here uses; a missing one starts at zero.
_OPTIONAL_SUFFIX = ".num_batches_tracked"

Namer = Callable[[re.Match[str]], str]
Rules = tuple[tuple[re.Pattern[str], Namer], ...]


def _rules(*rules: tuple[str, Namer]) -> Rules:
    """Compile (pattern of our module path, its RepDistiller name); the tensor's leaf name is kept."""
    return tuple((re.compile(pattern + _LEAF), name) for pattern, name in rules)


def _stage(m: re.Match[str]) -> str:
    """RepDistiller numbers its stages from 1 (``layer1``), ours from 0."""
    return f"layer{int(m['s']) + 1}.{m['b']}"


def _basic_resnet(shortcut: str, head: str) -> Rules:
    """resnet.py (resnet8 ... resnet32x4, shortcut 'downsample', head 'fc') and resnetv2.py (ResNet50)."""
    return _rules(
        (r"^stem\.(?P<i>[01])", lambda m: f"{_CONV_BN[int(m['i'])]}1"),
        (r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.conv(?P<k>\d)\.(?P<i>[01])",
         lambda m: f"{_stage(m)}.{_CONV_BN[int(m['i'])]}{m['k']}"),
        (r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.shortcut\.(?P<i>[01])", lambda m: f"{_stage(m)}.{shortcut}.{m['i']}"),
        (r"^classifier", lambda m: head),
    )


_RESNET = _basic_resnet("downsample", "fc")
_RESNET50 = _basic_resnet("shortcut", "linear")
_WRN = _rules(
    (r"^stem", lambda m: "conv1"),
    (r"^groups\.(?P<g>\d+)\.(?P<b>\d+)\.(?P<name>bn1|conv1|bn2|conv2)",
     lambda m: f"block{int(m['g']) + 1}.layer.{m['b']}.{m['name']}"),
    (r"^groups\.(?P<g>\d+)\.(?P<b>\d+)\.projection", lambda m: f"block{int(m['g']) + 1}.layer.{m['b']}.convShortcut"),
    (r"^final_bn", lambda m: "bn1"),
    (r"^classifier", lambda m: "fc"),
)
_MOBILENET = _rules(
    (r"^stem\.(?P<i>[01])", lambda m: f"conv1.{m['i']}"),
    # Our three conv_bn modules are RepDistiller's flat conv-BN-ReLU sequence, three slots each.
    (r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.body\.(?P<c>[012])\.(?P<i>[01])",
     lambda m: f"blocks.{m['s']}.{m['b']}.conv.{3 * int(m['c']) + int(m['i'])}"),
    (r"^head\.(?P<i>[01])", lambda m: f"conv2.{m['i']}"),
    (r"^classifier", lambda m: "classifier.0"),
)
_SHUFFLE_V1_CONVS = {"reduce": 1, "depthwise": 2, "expand": 3}
_SHUFFLE_V1 = _rules(
    (r"^stem\.(?P<i>[01])", lambda m: f"{_CONV_BN[int(m['i'])]}1"),
    (r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?P<name>reduce|depthwise|expand)\.(?P<i>[01])",
     lambda m: f"{_stage(m)}.{_CONV_BN[int(m['i'])]}{_SHUFFLE_V1_CONVS[m['name']]}"),
    (r"^classifier", lambda m: "linear"),
)
# A down unit numbers its convs 1-2 (left branch) then 3-5 (right branch); a basic unit 1-3.
_SHUFFLE_V2_FIRST = {"left": 1, "right": 3, "branch": 1}
_SHUFFLE_V2 = _rules(
    (r"^stem\.(?P<i>[01])", lambda m: f"{_CONV_BN[int(m['i'])]}1"),
    (r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?P<name>left|right|branch)\.(?P<c>\d)\.(?P<i>[01])",
     lambda m: f"{_stage(m)}.{_CONV_BN[int(m['i'])]}{_SHUFFLE_V2_FIRST[m['name']] + int(m['c'])}"),
    (r"^head\.(?P<i>[01])", lambda m: f"{_CONV_BN[int(m['i'])]}2"),
    (r"^classifier", lambda m: "linear"),
)


def _vgg(architecture: str) -> Rules:
    """RepDistiller keeps one Sequential per stage (``block0`` ...); ours is one flat ``body``.

    Both lay a conv out as conv, BN, ReLU; ours adds a max-pool after each of the first stages, so
    the flat index of every conv is found by walking the stage widths.
    """
    slots: dict[int, str] = {}
    index = 0
    for stage, widths in enumerate(_STAGES[architecture]):
        for position in range(len(widths)):
            slots[index], slots[index + 1] = f"block{stage}.{3 * position}", f"block{stage}.{3 * position + 1}"
            index += 3
        index += 1 if stage < _POOLED_STAGES else 0
    return _rules(
        (r"^body\.(?P<i>\d+)", lambda m: slots[int(m["i"])]),
        (r"^classifier", lambda m: "classifier"),
    )


_FAMILIES: dict[str, Rules] = {
    **{name: _RESNET for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                                  "resnet110", "resnet8x4", "resnet32x4")},
    "ResNet50": _RESNET50,
    **{name: _WRN for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{name: _vgg(name) for name in _STAGES},
    "MobileNetV2": _MOBILENET,
    "mobile_half": _MOBILENET,
    "ShuffleV1": _SHUFFLE_V1,
    "ShuffleV2": _SHUFFLE_V2,
}

REPDISTILLER_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_FAMILIES, key=str.lower))
"""Architectures of the zoo that RepDistiller also trains, under the names both use."""


@lru_cache(maxsize=64)
def _layout(architecture: str, num_classes: int) -> tuple[tuple[str, str, torch.Size, torch.dtype], ...]:
    """(our key, RepDistiller key, shape, dtype) for every tensor, in our module order.

    The model is built on the meta device: only names and shapes are needed, not memory or init.
    """
    if architecture not in _FAMILIES:
        raise WeightsError(
            f"RepDistiller has no architecture {architecture!r} to convert from; "
            f"it shares these with the zoo: {', '.join(REPDISTILLER_ARCHITECTURES)}"
        )
    with torch.device("meta"):
        own = create_model(architecture, num_classes).state_dict()
    rows = []
    for key, tensor in own.items():
        for pattern, name in _FAMILIES[architecture]:
            if found := pattern.match(key):
                rows.append((key, f"{name(found)}.{found['leaf']}", tensor.shape, tensor.dtype))
                break
        else:  # a zoo model changed shape: a bug here, not in the user's file
            raise AssertionError(f"no RepDistiller name for {architecture} key {key!r}")
    theirs = [row[1] for row in rows]
    assert len(set(theirs)) == len(theirs), f"RepDistiller names of {architecture} collide"
    return tuple(rows)


def repdistiller_keys(architecture: str) -> dict[str, str]:
    """Our state-dict key -> RepDistiller's for `architecture`, in our module order."""
    return {ours: theirs for ours, theirs, _, _ in _layout(architecture, 1)}


def _num_classes(state: Mapping[str, Tensor], architecture: str) -> int | None:
    head = repdistiller_keys(architecture)["classifier.weight"]
    weight = state.get(head)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 and weight.shape[0] > 0 else None


def looks_like_repdistiller(state: Mapping[str, Tensor], architecture: str) -> bool:
    """True when `state` holds exactly RepDistiller's keys for `architecture` (shapes are not checked).

    Batch-norm step counters may be absent (see `from_repdistiller`); nothing else may be.
    """
    if architecture not in _FAMILIES:
        return False
    expected = set(repdistiller_keys(architecture).values())
    keys = set(state)
    return keys <= expected and all(k.endswith(_OPTIONAL_SUFFIX) for k in expected - keys)


def from_repdistiller(state: Mapping[str, Tensor], architecture: str) -> dict[str, Tensor]:
    """A RepDistiller state dict of `architecture` renamed to ours, key for key and shape for shape.

    The number of classes is read from the classifier. Raises WeightsError naming the architecture
    and the keys that are missing, unexpected or of another shape; the tensors themselves are not copied.
    """
    names = repdistiller_keys(architecture)
    if set(state) == set(names):
        raise WeightsError(f"these weights are already in itrd's layout for {architecture!r}; nothing to convert")
    num_classes = _num_classes(state, architecture)
    if num_classes is None:
        raise WeightsError(
            f"not a RepDistiller checkpoint of {architecture!r}: it has no (classes, features) classifier weight "
            f"{names['classifier.weight']!r}"
        )
    converted: dict[str, Tensor] = {}
    missing: list[str] = []
    wrong_shape: list[str] = []
    for ours, theirs, shape, dtype in _layout(architecture, num_classes):
        if theirs in state:
            tensor = state[theirs]
            if tensor.shape != shape:
                wrong_shape.append(f"{theirs}: file {tuple(tensor.shape)} vs {architecture} {tuple(shape)}")
            converted[ours] = tensor
        elif theirs.endswith(_OPTIONAL_SUFFIX):
            converted[ours] = torch.zeros(shape, dtype=dtype)
        else:
            missing.append(theirs)
    unexpected = sorted(set(state) - set(names.values()))
    problems = misfit_report(missing, unexpected, wrong_shape)
    if problems:
        raise WeightsError(f"not a RepDistiller checkpoint of {architecture!r}: " + "; ".join(problems))
    return converted
