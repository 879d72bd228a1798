"""``cmn-export``: train a CMN, export it to ONNX, quantize it to INT8, validate it."""

from __future__ import annotations

import sys
from pathlib import Path

import click


class CliError(click.ClickException):
    """One line on stderr, exit 1."""

    def show(self, file=None) -> None:  # noqa: D401 - click API
        click.echo(f"error: {self.format_message()}", err=True)


@click.group()
def main() -> None:
    """Training side of cmn-edge."""


@main.command()
@click.argument("datasets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default="runs/cmn", show_default=True, type=click.Path())
@click.option("--backbone", default="tf_efficientnet_lite0", show_default=True)
@click.option("--concepts", "num_concepts", default=512, show_default=True)
@click.option("--input-size", default=224, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["tail", "full"]),
    default="tail",
    show_default=True,
    help="tail: tune the last stages on cached early-stage features (CPU); full: end to end.",
)
@click.option("--epochs", default=10, show_default=True)
@click.option("--warmup-epochs", default=1, show_default=True, help="Backbone frozen.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=4e-5, show_default=True, help="Backbone LR; head 10x, proxies 100x.")
@click.option("--val-fraction", default=0.1, show_default=True, help="Train classes held out.")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--final-test/--no-final-test", default=True, show_default=True)
@click.option("--max-steps-per-epoch", default=0, hidden=True)
@click.option("--no-pretrained", is_flag=True, help="Random backbone init (tests).")
@click.option("--resume", type=click.Path(path_type=Path), help="A last.pt to continue from.")
def train(datasets, resume, no_pretrained, **options) -> None:
    """Train on DATASETS (folders with manifest.csv, or <class>/<img> trees)."""
    from cmn_edge.dataset import DatasetError

    from .checkpoint import CheckpointError
    from .train import TrainConfig
    from .train import train as run_training

    config = TrainConfig(datasets=[str(d) for d in datasets], pretrained=not no_pretrained,
                         **options)
    try:
        best = run_training(config, resume=resume)
    except (DatasetError, CheckpointError) as exc:
        raise CliError(str(exc)) from None
    click.echo(f"best checkpoint: {best}")


if __name__ == "__main__":
    sys.exit(main())
