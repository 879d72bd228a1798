"""The embedding heads a model can have: one table, one entry per head, as backbones have.

Each entry says how to build the model from a training config, which ``cmn-export train``
options are its own (stored in the config's ``head_options``), the metric loss it trains
with, and the weight of its own regularising loss. Training, checkpoints, ONNX export,
quantization and qat go through the model's common interface (``model.BackboneModel``), so
a third head is one more module and one more entry here. The table itself imports no
torch (``cmn-export --help`` lists its options); each entry imports its module when used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .model import BackboneModel

#: the head of configs and checkpoints written before heads existed
DEFAULT_HEAD = "cmn"

#: How a CMN head normalises each region's feature before projecting it. Upstream's
#: LayerNorm ("layer") keeps only each region's direction: the mean of the normalised regions
#: of a pretrained Lite0 retrieves at R@1 70.9 / 92.3 (cub100 / caltech97 test) against 85.2
#: / 94.3 for the plain average of the regions, which weighs each region by its magnitude.
#: "none" keeps the magnitudes (the backbone's ReLU6 bounds them), so a head that attends
#: evenly can start at the pretrained features' quality (``ConceptHead.init_from_features``).
CMN_TOKEN_NORMS = ("layer", "none")
#: How a CMN head starts: at random, or at the pretrained features of the training images.
CMN_HEAD_INITS = ("random", "features")
#: Which of a CMN head's weights training moves. "attention" leaves what each concept
#: measures (its vector, its query, the token projection) where ``--head-init features``
#: put it and learns only where it looks (the keys); "none" trains the backbone alone.
#: Swapping trained weights back to the start one group at a time (the model card) showed
#: that the learned queries and token projection are what cost the unseen Caltech
#: classes 2 R@1, while the trained backbone and keys did not.
CMN_HEAD_TRAIN = {
    "all": (),
    "attention": ("concepts", "query_norm.", "query_proj.", "token_norm.", "token_proj."),
    "none": ("",),
}


@dataclass(frozen=True)
class HeadOption:
    """One ``cmn-export train`` option of a head, stored as ``head_options[key]``."""

    flag: str
    key: str
    default: Any
    help: str
    #: the values it takes, where it is a choice (the CLI refuses others)
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HeadSpec:
    name: str
    description: str
    #: (config, pretrained, backbone weights file) -> model; ``config``: a TrainConfig dict
    build: Callable[[dict, bool, str | None], BackboneModel]
    #: (config, number of training classes) -> the metric loss on ``training_terms``' input
    criterion: Callable[[dict, int], nn.Module]
    #: config -> weight of the head's own regularising loss (``model.regulariser``)
    regulariser_weight: Callable[[dict], float]
    options: tuple[HeadOption, ...] = ()
    #: this head's options, with defaults -> None, or ValueError for a combination that
    #: would train nothing sensible (each option alone is checked by its ``choices``)
    check_options: Callable[[dict[str, Any]], None] = lambda values: None

    def head_options(self, config: dict) -> dict[str, Any]:
        """This head's options from a config, with the defaults for any it lacks."""
        given = config.get("head_options") or {}
        return {opt.key: given.get(opt.key, opt.default) for opt in self.options}


def _build_cmn(config: dict, pretrained: bool, weights: str | None) -> BackboneModel:
    from .model import CMN

    options = HEADS["cmn"].head_options(config)
    return CMN(
        config["backbone"],
        config["num_concepts"],
        pretrained=pretrained,
        backbone_weights=weights,
        token_norm=options["token_norm"],
    )


def _build_dgml(config: dict, pretrained: bool, weights: str | None) -> BackboneModel:
    from .dgml import DGML

    options = HEADS["dgml"].head_options(config)
    return DGML(
        config["backbone"],
        options["groups"],
        options["group_dim"],
        pretrained=pretrained,
        backbone_weights=weights,
    )


def _cmn_criterion(config: dict, num_classes: int) -> nn.Module:
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    # the concept count stays the top-level --concepts / num_concepts of every config
    # written before heads existed
    return ProxyAnchorLoss(
        num_classes, config["num_concepts"], margin=config["margin"], alpha=config["alpha"]
    )


def _check_cmn_options(values: dict[str, Any]) -> None:
    if values["train"] != "all" and values["init"] != "features":
        # a random head kept still would rank by random directions
        raise ValueError(f"--head-train {values['train']} needs --head-init features")


def _dgml_criterion(config: dict, num_classes: int) -> nn.Module:
    from .dgml import GroupMetricLoss

    options = HEADS["dgml"].head_options(config)
    return GroupMetricLoss(
        num_classes, options["groups"], options["group_dim"], config["margin"], config["alpha"]
    )


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec(
            name="cmn",
            description="Concept Metrics Network (TNNLS 2025): one dimension per concept",
            build=_build_cmn,
            criterion=_cmn_criterion,
            regulariser_weight=lambda config: float(config["separation_weight"]),
            check_options=_check_cmn_options,
            options=(
                HeadOption(
                    "--token-norm",
                    "token_norm",
                    "layer",
                    "CMN: 'layer' (upstream's LayerNorm of each region) or 'none' (keep each "
                    "region's magnitude, as average pooling does).",
                    choices=CMN_TOKEN_NORMS,
                ),
                HeadOption(
                    "--head-init",
                    "init",
                    "random",
                    "CMN: 'random', or 'features': start the head at the pretrained features "
                    "(identity projection, even attention, queries along their principal "
                    "directions); best with --token-norm none.",
                    choices=CMN_HEAD_INITS,
                ),
                HeadOption(
                    "--head-train",
                    "train",
                    "all",
                    "CMN: which head weights training moves: 'all'; 'attention' (only where "
                    "each concept looks; what it measures stays at the features start); "
                    "'none' (the backbone alone). Not 'all' needs --head-init features.",
                    choices=tuple(CMN_HEAD_TRAIN),
                ),
            ),
        ),
        HeadSpec(
            name="dgml",
            description="DGML attentive grouping (Xu et al., TPAMI): G groups of D dimensions",
            build=_build_dgml,
            criterion=_dgml_criterion,
            regulariser_weight=lambda config: float(
                HEADS["dgml"].head_options(config)["diversity_weight"]
            ),
            options=(
                HeadOption("--groups", "groups", 3, "DGML: number of groups G."),
                HeadOption("--group-dim", "group_dim", 170, "DGML: dimensions per group D."),
                HeadOption(
                    "--diversity-weight",
                    "diversity_weight",
                    0.01,
                    "DGML: weight of the loss that keeps an image's groups apart.",
                ),
            ),
        ),
    )
}


def get_head(name: str | None) -> HeadSpec:
    """The table's entry; ``None`` (a config from before heads existed) is the CMN."""
    try:
        return HEADS[name or DEFAULT_HEAD]
    except KeyError:
        raise ValueError(f"unknown head '{name}' (known: {', '.join(HEADS)})") from None


def build_model(
    config: dict, pretrained: bool = False, backbone_weights: str | None = None
) -> BackboneModel:
    """The model a training config describes; by default with random weights, to load a
    checkpoint into (training passes its ``pretrained`` and ``backbone_weights``)."""
    model = get_head(config.get("head")).build(config, pretrained, backbone_weights)
    model.input_size = int(config.get("input_size", 224))
    return model


def head_option_values(head: str, given: dict[str, Any]) -> dict[str, Any]:
    """``head_options`` for ``head`` from the train command's values of every head's options;
    an option of another head set away from its default is refused (it would do nothing)."""
    chosen = get_head(head)
    for spec in HEADS.values():
        for opt in spec.options:
            if spec is not chosen and opt.key in given and given[opt.key] != opt.default:
                raise ValueError(f"{opt.flag} applies to --head {spec.name}, not --head {head}")
    values = {opt.key: given.get(opt.key, opt.default) for opt in chosen.options}
    chosen.check_options(values)
    return values


def frozen_head_parameters(model: nn.Module, config: dict) -> list[str]:
    """Names of the head's parameters ``--head-train`` keeps where they started."""
    if get_head(config.get("head")).name != "cmn":
        return []
    prefixes = CMN_HEAD_TRAIN[HEADS["cmn"].head_options(config)["train"]]
    names = [name for name, _ in model.head.named_parameters()]
    return [f"head.{n}" for n in names if any(n.startswith(p) for p in prefixes)]


__all__ = [
    "CMN_HEAD_TRAIN",
    "DEFAULT_HEAD",
    "HEADS",
    "HeadOption",
    "HeadSpec",
    "build_model",
    "frozen_head_parameters",
    "get_head",
    "head_option_values",
]
