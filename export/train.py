"""Training a CMN or DGML (``--head``, ``export/heads.py``): Proxy-Anchor + the head's own
regulariser (concept separation, group diversity), selected on held-out train classes.

Two modes share everything but the input pipeline: ``full`` trains end to end on augmented
images (use it on a GPU); ``tail`` freezes the early stages, caches their features once and
tunes the last stages and the head on random crops of the cached maps (the CPU path).
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmn_edge.metrics import retrieval_metrics

from . import data as D
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_atomic
from .heads import build_model, frozen_head_parameters, get_head, head_option_values
from .model import BackboneModel


@dataclass
class TrainConfig:
    datasets: list[str]
    out_dir: str = "runs/cmn"
    backbone: str = "tf_efficientnet_lite0"
    #: the embedding head (``export/heads.py``): "cmn" or "dgml"
    head: str = "cmn"
    num_concepts: int = 512  # CMN
    #: the head's own options (DGML: groups, group_dim, diversity_weight); the table's
    #: defaults fill in what is missing
    head_options: dict = field(default_factory=dict)
    input_size: int = 224
    mode: str = "tail"  # "tail" (cached early stages) or "full"
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-5  # backbone; the head gets head_lr_mult x, proxies proxy_lr_mult x
    head_lr_mult: float = 10.0
    proxy_lr_mult: float = 100.0
    weight_decay: float = 5e-4
    separation_weight: float = 0.1
    #: weight of the relational distillation towards the pretrained backbone (0: off); see
    #: :func:`relational_distillation`; 3 is what won on Lite0 (hold-out MAP@R 93.1 -> 94.3)
    distill_weight: float = 3.0
    #: bfloat16 autocast and channels-last for the backbone (the head and losses stay float32):
    #: EfficientNet's depthwise convolutions are slow in float32 on a GPU
    amp: bool = False
    margin: float = 0.1
    alpha: float = 32.0
    val_fraction: float = 0.1
    #: MAP@R separates checkpoints where R@1 saturates (large easy classes in the hold-out)
    select_metric: str = "MAP@R"
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    final_test: bool = True
    pretrained: bool = True
    #: a state dict of the backbone network (timm / torchvision names) to start from instead
    #: of the table's weights: torchvision's ResNet-50 ImageNet weights, or a carried copy
    backbone_weights: str | None = None
    max_steps_per_epoch: int = 0  # 0 = whole epoch; small values for smoke tests
    command: str = field(default_factory=lambda: " ".join(["cmn-export", *sys.argv[1:]]))


def relational_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation between each image's in-batch similarity rows, averaged.

    Metric learning on a few dozen train classes can forget what the pretrained backbone
    knew about everything else (the bundled model fell 2.2 R@1 below the ImageNet features
    on unseen Caltech classes). This keeps the *order* of each image's similarities to the
    rest of the batch close to the pretrained one. Correlation, not squared error: the two
    spaces have different similarity ranges (all-positive pooled ReLU6 features against
    concept scores), and only the relative order matters for retrieval. The diagonal
    (self-similarity) is left out.
    """
    n = student.shape[0]
    if n < 3:
        return student.new_zeros(())
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)

    def rows(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.float(), dim=1)
        sim = (x @ x.t())[off_diagonal].view(n, n - 1)
        sim = sim - sim.mean(dim=1, keepdim=True)
        return torch.nn.functional.normalize(sim, dim=1)

    return 1.0 - (rows(student) * rows(teacher)).sum(dim=1).mean()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def format_metrics(metrics: dict) -> str:
    """``R@1 85.98, ..., MAP@R 43.74``: one way for every line the trainer prints."""
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


@torch.no_grad()
def embed_images(
    model: BackboneModel,
    data: D.LabelledSet,
    device: torch.device,
    workers: int = 0,
    pooled_backbone: bool = False,
):
    """Embeddings of ``data``; ``pooled_backbone``: the backbone's average-pooled features
    instead (the anchor a trained model has to beat)."""
    preprocess = model.spec.preprocess(model.input_size)
    net = model.backbone if pooled_backbone else model
    loader = DataLoader(
        D.ImageSet(data, D.eval_transform(preprocess)),
        batch_size=64,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model.eval()
    out = []
    for x, _ in tqdm(loader, desc="embedding", leave=False):
        y = net(x.to(device))
        out.append((y.mean(dim=(2, 3)) if pooled_backbone else y).cpu())
    return torch.cat(out).numpy()


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)
        everything, self.class_names = D.merge_datasets(config.datasets, "train")
        self.train_set, self.val_set = D.hold_out_classes(
            everything, config.val_fraction, config.seed
        )
        self.num_classes = len(set(self.train_set.labels))
        self.head = get_head(config.head)
        config.head_options = head_option_values(config.head, config.head_options)
        settings = asdict(config)
        self.model = build_model(settings, config.pretrained, config.backbone_weights)
        self.model.to(self.device)
        if config.amp:
            self.model.backbone.to(memory_format=torch.channels_last)
        self.preprocess = self.model.spec.preprocess(config.input_size)
        self.criterion = self.head.criterion(settings, self.num_classes).to(self.device)
        self.regulariser_weight = self.head.regulariser_weight(settings)
        backbone_params = [
            p
            for p in (
                self.model.backbone.tail.parameters()
                if config.mode == "tail"
                else self.model.backbone.parameters()
            )
        ]
        if config.mode == "tail":
            for p in self.model.backbone.trunk.parameters():
                p.requires_grad_(False)
        self.model.freeze_batchnorm()
        self.backbone_params = [p for p in backbone_params if p.requires_grad]
        parameters = dict(self.model.named_parameters())
        for name in frozen_head_parameters(self.model, settings):  # --head-train
            parameters[name].requires_grad_(False)
        head_params = [p for p in self.model.head.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.backbone_params, "lr": config.lr},
                {"params": head_params, "lr": config.lr * config.head_lr_mult},
                {
                    "params": self.criterion.parameters(),
                    "lr": config.lr * config.proxy_lr_mult,
                },
            ],
            weight_decay=config.weight_decay,
        )
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # the pretrained network as it was before any tuning (the part being tuned: the
        # tail in tail mode), frozen, for the distillation term
        self.teacher = None
        if config.distill_weight > 0:
            source = self.model.backbone.tail if config.mode == "tail" else self.model.backbone
            self.teacher = copy.deepcopy(source).eval().requires_grad_(False)
        self.epoch = 0
        self.best = {"epoch": -1, "val": {}}
        #: the hold-out metrics of the pretrained backbone's pooled features, before tuning
        self.holdout_anchor: dict = {}
        self.history: list[dict] = []
        self._features: dict[str, torch.Tensor] = {}

    # --- inputs --------------------------------------------------------------------------
    def _cached(self, name: str, data: D.LabelledSet) -> torch.Tensor:
        if name not in self._features:
            self._features[name] = D.cache_trunk_features(
                self.model.backbone.trunk, data, self.preprocess, self.out / "cache", self.device
            )
        return self._features[name]

    def _centre_crops(self, name: str, data: D.LabelledSet):
        """The cached trunk features of ``data``, centre-cropped, in batches on the device:
        what the tail sees at evaluation (tail mode)."""
        grid = self._trunk_grid()
        features = self._cached(name, data)
        for start in range(0, len(features), 128):
            yield D.center_crop(features[start : start + 128].float(), grid).to(self.device)

    def _trunk_grid(self) -> int:
        """The trunk's grid (stride 16) at the input size: 'same' padding rounds up, so a
        260 px image gives 17 cells, as the full network computes it, not 260 // 16."""
        return -(-self.config.input_size // (self.model.spec.stride // 2))

    def _train_batches(self):
        config = self.config
        labels = torch.tensor(self.train_set.labels)
        if config.mode == "tail":
            features = self._cached("train", self.train_set)
            grid = self._trunk_grid()
            order = torch.randperm(len(labels))
            for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
                idx = order[start : start + config.batch_size]
                x = D.random_crop_flip(features[idx].float(), grid)
                yield x.to(self.device), labels[idx].to(self.device)
        else:
            loader = DataLoader(
                D.ImageSet(self.train_set, D.train_transform(self.preprocess)),
                batch_size=config.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=config.workers,
                pin_memory=self.device.type == "cuda",
            )
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _steps_per_epoch(self) -> int:
        steps = len(self.train_set) // self.config.batch_size
        cap = self.config.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    def _feature_map(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map, in float32 whatever the autocast."""
        if self.config.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return network(x).float()

    def _training_terms(self, x: torch.Tensor):
        """(embedding, the metric loss's input, the head's regulariser) of a batch."""
        backbone = self.model.backbone
        features = self._feature_map(backbone.tail if self.config.mode == "tail" else backbone, x)
        return self.model.training_terms(features)

    # --- training ------------------------------------------------------------------------
    def _set_lr(self, epoch: int, step: int, steps: int) -> None:
        """Constant during warm-up, then cosine decay over the remaining epochs."""
        config = self.config
        decay_epochs = max(1, config.epochs - config.warmup_epochs)
        t = max(0.0, (epoch - config.warmup_epochs + step / max(1, steps)) / decay_epochs)
        factor = 1.0 if epoch < config.warmup_epochs else 0.5 * (1 + math.cos(math.pi * t))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def train_epoch(self) -> dict:
        config, epoch = self.config, self.epoch
        warm = epoch < config.warmup_epochs
        for p in self.backbone_params:
            p.requires_grad_(not warm)
        self.model.train()
        self.model.freeze_batchnorm()
        steps = self._steps_per_epoch()
        regulariser = self.model.regulariser  # "separation" (CMN), "diversity" (DGML)
        totals = {"loss": 0.0, "proxy_anchor": 0.0, regulariser: 0.0, "distill": 0.0}
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}" + (" (warm-up)" * warm))
        count = 0
        for step, (x, y) in enumerate(self._train_batches()):
            if step >= steps:
                break
            self._set_lr(epoch, step, steps)
            embedding, metric_input, regularising = self._training_terms(x)
            metric_loss = self.criterion(metric_input, y)
            loss = metric_loss + self.regulariser_weight * regularising
            if self.teacher is not None:
                with torch.no_grad():
                    pooled = self._feature_map(self.teacher, x).mean(dim=(2, 3))  # pretrained GAP
                distill = relational_distillation(embedding, pooled)
                loss = loss + config.distill_weight * distill
                totals["distill"] += distill.item()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # only what has gradients: with --head-train none the warm-up trains the
            # proxies alone, and torch refuses to clip an empty list
            trained = [p for p in self.model.parameters() if p.grad is not None]
            if trained:
                torch.nn.utils.clip_grad_value_(trained, 10)
            torch.nn.utils.clip_grad_value_(self.criterion.parameters(), 10)
            self.optimizer.step()
            totals["loss"] += loss.item()
            totals["proxy_anchor"] += metric_loss.item()
            totals[regulariser] += regularising.item()
            count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
        bar.close()
        return {k: v / max(1, count) for k, v in totals.items()}

    @torch.no_grad()
    def validate(self, pooled_backbone: bool = False) -> dict:
        """Hold-out metrics of the model; ``pooled_backbone``: of the backbone's
        average-pooled features instead (before training: the plain pretrained anchor)."""
        if self.val_set is None:
            return {}
        self.model.eval()
        if self.config.mode == "tail":
            out = []
            for crop in self._centre_crops("val", self.val_set):
                if pooled_backbone:
                    out.append(self.model.backbone.tail(crop).mean(dim=(2, 3)).cpu())
                else:
                    out.append(self.model.forward_tail(crop).cpu())
            embeddings = torch.cat(out).numpy()
        else:
            embeddings = embed_images(
                self.model, self.val_set, self.device, self.config.workers, pooled_backbone
            )
        return retrieval_metrics(embeddings, np.array(self.val_set.labels))

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best": self.best,
            "holdout_anchor": self.holdout_anchor,
            "history": self.history,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }

    def resume(self, path: Path) -> None:
        state = load_checkpoint(path, trusted=True)
        if "optimizer" not in state:
            raise CheckpointError(
                f"{path}: holds model weights only, not a resumable training state"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.criterion.load_state_dict(state["criterion"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).splitlines()[0]
            raise CheckpointError(f"{path}: does not fit this training setup ({reason})") from None
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        self.holdout_anchor = state.get("holdout_anchor", {})
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])

    @torch.no_grad()
    def initialise_head(self) -> dict:
        """``--head-init features``: the head starts at the pretrained features of the
        training images (``ConceptHead.init_from_features``), before any step."""
        self.model.eval()
        if self.config.mode == "tail":
            tail = self.model.backbone.tail
            crops = self._centre_crops("train", self.train_set)
            features = torch.cat([tail(crop).cpu() for crop in crops])
        else:
            loader = DataLoader(
                D.ImageSet(self.train_set, D.eval_transform(self.preprocess)),
                batch_size=64,
                num_workers=self.config.workers,
            )
            features = torch.cat([self.model.backbone(x.to(self.device)).cpu() for x, _ in loader])
        done = self.model.head.init_from_features(features.to(self.device))
        self._proxies_at_class_means(features)
        return done

    @torch.no_grad()
    def _proxies_at_class_means(self, features: torch.Tensor) -> None:
        """Proxy-Anchor's proxies start at each class's mean embedding, not at random: from a
        head that already ranks like the pretrained features, random proxies pull every
        class somewhere arbitrary in the first steps (hold-out MAP@R 95.0 -> 92.9 after the
        warm-up epoch without this)."""
        proxies = getattr(self.criterion, "proxies", None)
        if proxies is None:
            return
        self.model.eval()
        embedding = torch.cat(
            [
                self.model.embed_features(features[s : s + 128].to(self.device)).cpu()
                for s in range(0, len(features), 128)
            ]
        )
        labels = torch.tensor(self.train_set.labels)
        means = torch.zeros(proxies.shape, dtype=embedding.dtype)
        means.index_add_(0, labels, embedding)
        proxies.copy_(torch.nn.functional.normalize(means, dim=1).to(proxies.device))

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def _save_best(self, state: dict) -> None:
        weights_only = {k: state[k] for k in ("format", "config", "model", "best")}
        save_atomic(weights_only, self.best_path)

    def fit(self) -> Path:
        config = self.config
        best_path = self.best_path
        if self.epoch == 0 and config.head_options.get("init") == "features":
            done = self.initialise_head()
            tqdm.write(
                f"head initialised from the pretrained features of {done['images']} training "
                f"images (principal directions explain {100 * done['variance_explained']:.1f}%)"
            )
            start = self.validate()
            if start:
                # the start is a candidate too: training that never beats the pretrained
                # features on the hold-out leaves them as best.pt, not a worse epoch
                tqdm.write(f"hold-out at the start: {format_metrics(start)} (epoch 0)")
                self.best = {"epoch": 0, "val": start}
                self._save_best(self.state())
        if self.epoch == 0 and not self.holdout_anchor:
            # before any tuning: what plain pretrained features score on the same classes
            self.holdout_anchor = self.validate(pooled_backbone=True)
            if self.holdout_anchor:
                shown = format_metrics(self.holdout_anchor)
                tqdm.write(f"hold-out anchor (pretrained backbone, average-pooled): {shown}")
        while self.epoch < config.epochs:
            started = time.time()
            losses = self.train_epoch()
            val = self.validate()
            seconds = time.time() - started
            record = {"epoch": self.epoch + 1, **losses, "val": val, "seconds": seconds}
            self.history.append(record)
            metric = config.select_metric
            improved = not val or val[metric] > self.best["val"].get(metric, -1.0)
            if improved:
                self.best = {"epoch": self.epoch + 1, "val": val}
            self.epoch += 1
            state = self.state()
            save_atomic(state, self.out / "last.pt")
            if improved:
                self._save_best(state)
            shown = format_metrics(val)
            tqdm.write(
                f"epoch {self.epoch}: loss {losses['loss']:.4f} | val {shown or '-'}"
                + (" (best)" if improved else "")
            )
        report = {
            "best": self.best,
            "holdout_anchor": self.holdout_anchor,
            "history": self.history,
            "config": asdict(config),
        }
        metric = config.select_metric
        if self.holdout_anchor and self.best["val"].get(metric, 0.0) < self.holdout_anchor[metric]:
            tqdm.write(
                f"warning: the best epoch's hold-out {metric} "
                f"({self.best['val'][metric]:.2f}) is below the plain pretrained backbone's "
                f"({self.holdout_anchor[metric]:.2f}): on classes like these, the backbone's "
                "average-pooled features retrieve better than this model"
            )
        if config.final_test:
            report["test"] = self.final_test(best_path)
        (self.out / "report.json").write_text(json.dumps(report, indent=2))
        return best_path

    def final_test(self, best_path: Path) -> dict:
        """Test classes, once, with the selected checkpoint: never used for selection."""
        self.model.load_state_dict(load_checkpoint(best_path)["model"])
        results = {}
        for root in config_roots(self.config):
            test, _ = D.merge_datasets([root], "test")
            embeddings = embed_images(self.model, test, self.device, self.config.workers)
            results[Path(root).name] = retrieval_metrics(embeddings, np.array(test.labels))
            tqdm.write(f"test {Path(root).name}: {results[Path(root).name]}")
        return results


def config_roots(config: TrainConfig) -> list[str]:
    return list(config.datasets)


def train(config: TrainConfig, resume: Path | None = None) -> Path:
    trainer = Trainer(config)
    if resume is not None:
        trainer.resume(resume)
    return trainer.fit()
