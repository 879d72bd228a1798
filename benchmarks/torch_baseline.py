"""The obvious alternative to ``cmn-edge embed FOLDER``: timm + a torch DataLoader, batch 32.

timm's ``tf_efficientnet_lite0`` with the same ImageNet weights as the default model's
backbone, global-average-pooled features, the same resize/crop, decoding in DataLoader
workers. Prints images/s over a folder, to set beside ``cmn-edge bench --pipeline FOLDER``:

    python benchmarks/torch_baseline.py FOLDER [--limit 2000] [--workers 2]

Needs the training extras (``pip install ".[export]"``).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmn_edge.embedder import list_images  # noqa: E402
from cmn_edge.metadata import Preprocess  # noqa: E402
from cmn_export.backbones import Backbone, get_spec  # noqa: E402


class Photos(Dataset):
    """What a user would write: open, convert, resize, crop, normalise, per item."""

    def __init__(self, paths: list[Path], preprocess: Preprocess) -> None:
        self.paths, self.p = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = Image.open(self.paths[i]).convert("RGB")
        w, h = image.size
        scale = self.p.resize_size / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left = (image.width - self.p.input_size) // 2
        top = (image.height - self.p.input_size) // 2
        image = image.crop((left, top, left + self.p.input_size, top + self.p.input_size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = x.view(self.p.input_size, self.p.input_size, 3).permute(2, 0, 1).float()
        mean = torch.tensor(self.p.mean).view(3, 1, 1)
        std = torch.tensor(self.p.std).view(3, 1, 1)
        return (x - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    paths = list_images(args.folder)[: args.limit] if args.limit else list_images(args.folder)
    backbone = Backbone(get_spec("tf_efficientnet_lite0")).eval()  # ImageNet weights
    loader = DataLoader(
        Photos(paths, Preprocess()), batch_size=args.batch_size, num_workers=args.workers
    )
    started, done = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in loader:
            features = backbone(batch)
            features = torch.nn.functional.normalize(features.mean((2, 3)), dim=1)
            done += len(features)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"torch {torch.__version__} + DataLoader ({args.workers} workers, {args.threads} "
        f"threads), batch {args.batch_size}: {done} images in {seconds:.1f} s = "
        f"{done / seconds:.1f} img/s; peak RSS of the main process {peak:.0f} MiB; load "
        "average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    )


if __name__ == "__main__":
    main()
