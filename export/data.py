"""Training data: several labelled folders merged, a class-disjoint validation hold-out, and
the trunk-feature cache that makes tuning the last stages affordable on a CPU."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from cmn_edge import preprocess as pp
from cmn_edge.dataset import DatasetError, Sample, check_retrieval_ready, load_samples
from cmn_edge.files import atomic_write
from cmn_edge.metadata import Preprocess


@dataclass(frozen=True)
class LabelledSet:
    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)


def merge_datasets(roots: list[str | Path], split: str) -> tuple[LabelledSet, list[str]]:
    """One labelled set over several datasets; labels are renumbered 0..K-1 across them."""
    paths: list[Path] = []
    names: list[str] = []
    keys: list[tuple[int, int]] = []
    for index, root in enumerate(roots):
        samples: list[Sample] = load_samples(root, split)
        check_retrieval_ready(samples, root)
        for s in samples:
            paths.append(s.path)
            keys.append((index, s.label))
            names.append(f"{Path(root).name}/{s.class_name}")
    order = {key: i for i, key in enumerate(sorted(set(keys)))}
    class_names = [""] * len(order)
    for key, name in zip(keys, names):
        class_names[order[key]] = name
    return LabelledSet(paths, [order[k] for k in keys]), class_names


def hold_out_classes(
    data: LabelledSet, fraction: float, seed: int
) -> tuple[LabelledSet, LabelledSet | None]:
    """Split off whole classes for model selection, so the test classes are never looked at."""
    classes = sorted(set(data.labels))
    count = int(round(len(classes) * fraction))
    if count == 0:
        return data, None
    if count >= len(classes):
        raise DatasetError(f"validation fraction {fraction} leaves no training classes")
    held = set(random.Random(seed).sample(classes, count))
    train_idx = [i for i, y in enumerate(data.labels) if y not in held]
    val_idx = [i for i, y in enumerate(data.labels) if y in held]
    remap = {y: i for i, y in enumerate(sorted(set(classes) - held))}
    train = LabelledSet(
        [data.paths[i] for i in train_idx], [remap[data.labels[i]] for i in train_idx]
    )
    val = LabelledSet([data.paths[i] for i in val_idx], [data.labels[i] for i in val_idx])
    return train, val


class ImageSet(Dataset):
    """Images through a torchvision transform (full end-to-end training and evaluation)."""

    def __init__(self, data: LabelledSet, transform) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image = pp.open_image(self.data.paths[index])
        return self.transform(image), self.data.labels[index]


def train_transform(preprocess: Preprocess):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(preprocess.input_size, scale=(0.16, 1.0)),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float32),
            T.Normalize([m / 255 for m in preprocess.mean], [s / 255 for s in preprocess.std]),
        ]
    )


def eval_transform(preprocess: Preprocess):
    """The training side's evaluation transform; cmn_edge.preprocess mirrors it in numpy."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(preprocess.resize_size),
            T.CenterCrop(preprocess.input_size),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float32),
            T.Normalize([m / 255 for m in preprocess.mean], [s / 255 for s in preprocess.std]),
        ]
    )


def cache_trunk_features(
    trunk: torch.nn.Module,
    data: LabelledSet,
    preprocess: Preprocess,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 32,
) -> torch.Tensor:
    """Trunk features of the whole resized image (no crop), fp16, cached on disk.

    Random crops and flips are then taken on the feature map, which stands in for random
    image crops and flips at a fraction of the cost.
    """
    key = hashlib.sha256()
    key.update(repr(preprocess).encode())
    for p in data.paths:
        key.update(str(p).encode())
    key.update(str(sum(float(t.float().sum()) for t in trunk.state_dict().values())).encode())
    path = cache_dir / f"trunk-{key.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    full = Preprocess(
        input_size=preprocess.resize_size,
        resize_size=preprocess.resize_size,
        mean=preprocess.mean,
        std=preprocess.std,
        channel_order=preprocess.channel_order,
        interpolation=preprocess.interpolation,
    )
    chunks = []
    trunk.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(data), batch_size), desc="caching trunk features"):
            batch = np.stack([pp.load(p, full) for p in data.paths[start : start + batch_size]])
            chunks.append(trunk(torch.from_numpy(batch).to(device)).half().cpu())
    features = torch.cat(chunks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, durable=False) as handle:  # a cache: computed again if lost
        torch.save(features, handle)
    return features


def random_crop_flip(features: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample random crop of ``size`` x ``size`` cells and a random horizontal flip."""
    n, _, h, w = features.shape
    out = []
    for i in range(n):
        top = random.randint(0, h - size)
        left = random.randint(0, w - size)
        crop = features[i, :, top : top + size, left : left + size]
        out.append(crop.flip(-1) if random.random() < 0.5 else crop)
    return torch.stack(out)


def center_crop(features: torch.Tensor, size: int) -> torch.Tensor:
    h, w = features.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return features[..., top : top + size, left : left + size]
