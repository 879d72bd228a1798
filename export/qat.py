"""Quantization-aware fine-tuning: make a trained CMN robust to the INT8 graph it ships as.

Post-training INT8 loses fidelity gradually along EfficientNet (see
``benchmarks/quant_sqnr.py``): no single layer is to blame, so no layer kept float fixes it.
This fine-tunes the weights with the INT8 rounding simulated where onnxruntime's static QDQ
quantization puts it (per-channel symmetric INT8 weights of every conv and of the head's
constant projections; per-tensor UINT8 activations after every conv+BN+activation, every
block and the head's quantized projections), by distillation from the model as it was:

    loss = (1 - cos(simulated INT8 student, float student)) + (1 - cos(float student, teacher))

The first term is the fidelity the INT8 file is judged by; the second keeps the float model
(the FP32 file) where it was. onnxruntime still calibrates and quantizes the result as usual. No
labels are used: any train-split images will do. Written by hand on torch's
``fake_quantize_*`` ops (straight-through gradients), which sit on the eager model as hooks
and parametrizations; torch.ao's FX flow was not tried (timm's dynamic SAME padding computes
its pads in Python from the input shape, which symbolic tracing does not follow).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import data as D
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint, save_atomic
from .model import BackboneModel


class _PerChannelWeights(nn.Module):
    """Symmetric INT8 per output channel (rows of a Linear, filters of a conv), while the
    simulation is on."""

    def __init__(self, simulation: Simulation) -> None:
        super().__init__()
        self.simulation = simulation

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_rows(weight) if self.simulation.enabled else weight


def fake_quantize_rows(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -128, 127)


class _ActivationRange:
    """UINT8 per tensor, range from a moving average of batch min/max (torch.ao's default)."""

    def __init__(self, momentum: float = 0.01) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.momentum = momentum

    def __call__(self, x: torch.Tensor, enabled: bool, observe: bool) -> torch.Tensor:
        if not enabled:
            return x
        if observe or self.low is None:
            low, high = x.detach().min().clamp_max(0), x.detach().max().clamp_min(0)
            if self.low is None:
                self.low, self.high = low, high
            else:
                self.low = self.low + self.momentum * (low - self.low)
                self.high = self.high + self.momentum * (high - self.high)
        scale = ((self.high - self.low) / 255.0).clamp_min(1e-8).float().reshape(1)
        zero = torch.round(-self.low / scale).clamp(0, 255).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


@dataclass
class Simulation:
    """The fake quantization attached to a model; ``enabled`` switches it off for the float
    pass, ``observe`` freezes the activation ranges once they have settled."""

    ranges: list[_ActivationRange]
    hooks: list
    parametrized: list[nn.Module]
    enabled: bool = True
    observe: bool = True

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module in self.parametrized:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def simulate_int8(model: BackboneModel) -> Simulation:
    """Attach INT8 rounding where onnxruntime's QDQ quantization of the model puts it (the
    head says where in itself: ``simulate_int8`` of ``ConceptHead`` / ``GroupHead``)."""
    sim = Simulation([], [], [])

    def quantize_output(module: nn.Module) -> None:
        rng = _ActivationRange()
        sim.ranges.append(rng)
        sim.hooks.append(
            module.register_forward_hook(lambda _m, _i, out: rng(out, sim.enabled, sim.observe))
        )

    backbone = model.backbone
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            parametrize.register_parametrization(module, "weight", _PerChannelWeights(sim))
            sim.parametrized.append(module)
        # conv + BN (+ activation) as one quantized tensor: timm's BatchNormAct2d, or a plain BN
        if isinstance(module, nn.BatchNorm2d):
            quantize_output(module)
    for block in backbone.modules():
        if type(block).__name__ in ("DepthwiseSeparableConv", "InvertedResidual", "Bottleneck"):
            quantize_output(block)  # after the residual add
    model.head.simulate_int8(sim, quantize_output)
    return sim


def _cosine_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def fine_tune(
    checkpoint: Path,
    datasets: list[str],
    out: Path,
    epochs: int = 3,
    lr: float = 1e-5,
    batch_size: int = 64,
    observe_epochs: float = 0.5,
    int8_weight: float = 1.0,
    workers: int = 2,
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Fine-tune ``checkpoint`` as described above and save a cmn-export checkpoint to ``out``."""
    from .train import pick_device, seed_everything

    seed_everything(seed)
    dev = pick_device(device)
    model, config = model_from_checkpoint(checkpoint)
    source = load_checkpoint(checkpoint)
    teacher = copy.deepcopy(model).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.to(dev)
    model.freeze_batchnorm()
    sim = simulate_int8(model)
    images, _ = D.merge_datasets(datasets, "train")
    loader = DataLoader(
        D.ImageSet(images, D.train_transform(model.spec.preprocess(model.input_size))),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps, step = epochs * len(loader), 0
    history = []
    for epoch in range(epochs):
        model.train()
        model.freeze_batchnorm()
        totals = {"int8_gap": 0.0, "float_gap": 0.0}
        for x, _ in tqdm(loader, desc=f"qat epoch {epoch + 1}/{epochs}"):
            x = x.to(dev, non_blocking=True)
            sim.observe = step < observe_epochs * len(loader)
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                target = teacher(x)
            sim.enabled = True
            simulated = model(x)
            sim.enabled = False
            floating = model(x)
            # the INT8 file is judged against its own FP32 twin; the teacher anchors the twin
            int8_gap = _cosine_gap(simulated, floating)
            float_gap = _cosine_gap(floating, target)
            loss = int8_weight * int8_gap + float_gap
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["int8_gap"] += int8_gap.item()
            totals["float_gap"] += float_gap.item()
            step += 1
        record = {"epoch": epoch + 1, **{k: v / len(loader) for k, v in totals.items()}}
        history.append(record)
        tqdm.write(
            f"qat epoch {epoch + 1}: 1-cos simulated INT8 to float {record['int8_gap']:.5f}, "
            f"float to the original {record['float_gap']:.5f}"
        )
    sim.remove()
    model.cpu()
    config = dict(config)
    config["qat"] = {
        "source_checkpoint": str(checkpoint),
        "datasets": list(datasets),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "int8_weight": int8_weight,
        "seed": seed,
        "history": history,
    }
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "model": model.state_dict(),
        "best": source.get("best", {}),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, out)
    return config["qat"]
