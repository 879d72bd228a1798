"""Checkpoints: cmn-export's own, and the upstream CMN ``train.py`` state dicts."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from cmn_edge.files import atomic_write
from cmn_edge.files import file_sha256 as file_sha256  # callers import it from here

from .model import CMN, BackboneModel

CHECKPOINT_FORMAT = "cmn-export-checkpoint/1"

#: upstream shchen0001/CMN module names -> ours (the backbone is torchvision ResNet-50).
UPSTREAM_HEAD_NAMES = {
    "MLP1": "head.token_proj",
    "lnorm1": "head.token_norm",
    "MLP2": "head.key_proj",
    "lnorm2": "head.key_norm",
    "MLP3": "head.query_proj",
    "lnorm3": "head.query_norm",
    "concept_v": "head.concepts",
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of an unknown layout."""


def save_atomic(obj: dict, path: Path) -> None:
    """Write next to the target, fsync, then rename: a crash, a kill or a full disk never
    leaves half a checkpoint, and a failed save keeps the previous one."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def load_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """Tensors and plain data only, unless ``trusted`` (our own resumable ``last.pt``, which
    carries RNG states): a checkpoint from elsewhere must not be able to run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors; refused, since loading it "
                "could run code (a training state is only loaded by --resume)"
            ) from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({exc})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (found {type(state).__name__})")
    return state


def model_from_checkpoint(path: str | Path) -> tuple[BackboneModel, dict]:
    """The model (CMN or DGML: the config's ``head``, CMN when absent, as in every checkpoint
    written before heads existed) and its training config from a cmn-export checkpoint."""
    from .heads import build_model

    state = load_checkpoint(path)
    if state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(
            f"{path}: not a cmn-export checkpoint (for upstream CMN state dicts use "
            "--upstream-checkpoint)"
        )
    config = state["config"]
    try:
        model = build_model(config)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: config does not describe a model ({exc})") from None
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({exc})") from None
    return model, config


def convert_upstream_state(state: dict) -> dict[str, torch.Tensor]:
    """Rename an upstream CMN state dict (``model.*`` ResNet-50 + MLP/lnorm/concept_v)."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "concept_v" not in state or not any(k.startswith("model.") for k in state):
        raise CheckpointError("not an upstream CMN state dict (no 'concept_v' / 'model.*' keys)")
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("model."):
            name = key.removeprefix("model.")
            if name.startswith("fc."):
                continue  # upstream keeps the unused ImageNet classifier
            converted[_resnet_key(name)] = value
            continue
        module, _, rest = key.partition(".")
        if module not in UPSTREAM_HEAD_NAMES:
            raise CheckpointError(f"unexpected key '{key}' in upstream checkpoint")
        converted[UPSTREAM_HEAD_NAMES[module] + (f".{rest}" if rest else "")] = value
    return converted


def _resnet_key(name: str) -> str:
    """torchvision ResNet key -> our Backbone(trunk, tail) key (tail = layer4)."""
    stem = {"conv1": 0, "bn1": 1}
    layers = {"layer1": 4, "layer2": 5, "layer3": 6}
    first, _, rest = name.partition(".")
    if first in stem:
        return f"backbone.trunk.{stem[first]}.{rest}"
    if first in layers:
        return f"backbone.trunk.{layers[first]}.{rest}"
    if first == "layer4":
        return f"backbone.tail.0.{rest}"
    raise CheckpointError(f"unexpected backbone key 'model.{name}' in upstream checkpoint")


def model_from_upstream(path: str | Path) -> CMN:
    """A ResNet-50 CMN from a state dict saved by upstream ``train.py``, without edits."""
    state = load_checkpoint(path)
    try:
        converted = convert_upstream_state(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    num_concepts, concept_dim = converted["head.concepts"].shape
    model = CMN("resnet50", num_concepts, concept_dim=concept_dim, pretrained=False)
    own = {k for k in model.state_dict() if not k.startswith("backbone.classifier")}
    missing = sorted(own - set(converted))
    if missing:
        raise CheckpointError(f"{path}: upstream checkpoint lacks {missing[:3]}")
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit ResNet-50 CMN ({exc})") from None
    model.input_size = 224
    return model
