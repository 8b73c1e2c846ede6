"""Per-class results of a test: accuracy per class, and the confusion matrix as a table and a picture.

`TransferModule` counts the matrix while it tests (rows: true class, columns: predicted class);
`per_class_results` turns the counts into what a run keeps: `test/acc_per_class` in metrics.json,
`confusion_matrix.csv` and `confusion_matrix.png` in the run dir, and the picture in TensorBoard.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from transferlab.store.rundir import RunDir

log = logging.getLogger(__name__)

#: the TensorBoard tag of the picture (Images tab)
TENSORBOARD_TAG = "test/confusion_matrix"
#: the corner cell of the csv header: what its rows and columns are
CSV_CORNER = "true \\ predicted"
#: above this many classes the cells carry no numbers (they would not be readable)
MAX_ANNOTATED_CLASSES = 20


def per_class_results(trainer, model, output_dir: Path) -> dict:
    """`{"test/acc_per_class": {class name: accuracy}}` after a test, and the matrix written and logged.

    Empty when the run did not test (test=false, an Optuna trial): nothing to report.
    """
    matrix = getattr(model, "test_confusion_matrix", None)
    if matrix is None:
        return {}
    names = class_names(model, matrix.shape[0])
    if trainer.is_global_zero:  # one writer under DDP; every rank holds the same summed matrix
        run_dir = RunDir(output_dir)
        write_csv(matrix, names, run_dir.confusion_csv)
        figure = draw(matrix, names, title=_title(model))
        figure.savefig(run_dir.confusion_png, dpi=110)
        log_figure(trainer, figure)
        _close(figure)
    # the images the test numbers describe (all of the split, or what trainer.limit_test_batches left)
    return {
        "test/acc_per_class": dict(zip(names, accuracy_per_class(matrix))),
        "test/images": int(matrix.sum()),
    }


def class_names(model, num_classes: int) -> list[str]:
    """The data's class names the model recorded (datamodule.describe()), else class indices."""
    names = list((getattr(model, "data_info", None) or {}).get("class_names") or [])
    return [str(n) for n in names] if len(names) == num_classes else [str(i) for i in range(num_classes)]


def accuracy_per_class(matrix: torch.Tensor) -> list[float | None]:
    """Correct / tested, per true class; None for a class the test set has no image of (JSON has no NaN)."""
    counts = matrix.to(torch.float64)
    tested = counts.sum(dim=1)
    return [None if n == 0 else float(c / n) for c, n in zip(counts.diagonal().tolist(), tested.tolist())]


def write_csv(matrix: torch.Tensor, names: Sequence[str], path: Path) -> None:
    """Rows: true class, columns: predicted class, each labelled with its class name."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([CSV_CORNER, *names])
        for name, row in zip(names, matrix.tolist()):
            writer.writerow([name, *row])


def read_csv(path: Path) -> tuple[list[str], list[list[int]]]:
    """(class names, counts) back from `write_csv`'s file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], [[int(v) for v in row[1:]] for row in rows[1:]]


def draw(matrix: torch.Tensor, names: Sequence[str], title: str = ""):
    """The matrix as a labelled heat map, coloured by the share of each true class (row)."""
    # heavy: matplotlib, only when a matrix is drawn; the Agg backend is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    counts = matrix.to(torch.float64)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(names)
    side = max(5.0, min(0.45 * n + 2.5, 30.0))
    figure, ax = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_xticks(
        range(n),
        labels=names,
        rotation=45 if n > 2 else 0,
        ha="right" if n > 2 else "center",
        fontsize="small" if n <= 30 else "xx-small",
    )
    ax.set_yticks(range(n), labels=names, fontsize="small" if n <= 30 else "xx-small")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= MAX_ANNOTATED_CLASSES:
        for (i, j), count in _cells(matrix):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize="small",
                color="white" if shares[i, j] > 0.5 else "black",
            )
    accuracy = float(counts.diagonal().sum() / counts.sum()) if counts.sum() > 0 else math.nan
    ax.set_title(
        (f"{title}\n" if title else "") + f"test accuracy {accuracy:.4f} on {int(counts.sum())} images"
    )
    return figure


def _cells(matrix: torch.Tensor):
    for i, row in enumerate(matrix.tolist()):
        for j, count in enumerate(row):
            yield (i, j), count


def _title(model) -> str:
    """`Confusion matrix: cifar10, cnn_small` from what the model recorded."""
    dataset = (getattr(model, "data_info", None) or {}).get("dataset")
    backbone = getattr(model.backbone, "name", None) or type(model.backbone).__name__
    return "Confusion matrix: " + ", ".join(str(part) for part in (dataset, backbone) if part)


def log_figure(trainer, figure, tag: str = TENSORBOARD_TAG) -> None:
    """The picture in TensorBoard's Images tab under `tag`, at the step the run ended."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
            logger.experiment.flush()


def _close(figure) -> None:
    import matplotlib.pyplot as plt  # heavy: matplotlib (see draw)

    plt.close(figure)
