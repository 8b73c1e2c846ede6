"""`python -m transferlab.predict RUN_DIR_OR_CKPT PATH...`: classify new images with a trained model.

Images are read and prepared as the run's evaluation images were (decoded to RGB, short side
resized to the run's image size and center-cropped, as `data=imagefolder` does; then the
run's normalization), in batches. Files that cannot be read are skipped with one warning
each and counted at the end; when none can be read, nothing is written and the command
exits 2. A checkpoint calibrated with `calibration.temperature=auto` records a temperature: the
logits are divided by it before the softmax, and a line says so (`--uncalibrated`: not).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from transferlab.cli.args import (
    CommandLine,
    check_folder_writable,
    check_not_an_input,
    pick_device,
    positive_int,
)
from transferlab.store.files import write_atomically
from transferlab.store.rundir import checkpoint_file
from transferlab.utils.errors import UserError, exit_with

#: rows of the printed table; the CSV holds them all
TABLE_ROWS = 50


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandLine(
        prog="python -m transferlab.predict",
        description=(
            "Classify images with a trained transferlab model. The run's image size, normalization and\n"
            "class names come from its checkpoint; images are resized (short side) and center-cropped\n"
            "to the run's size. Prints a table and writes a CSV: path, class, probability (and the next\n"
            "classes with --top-k). Files that cannot be read are skipped with a warning. A run calibrated\n"
            "with calibration.temperature=auto divides its logits by its temperature (--uncalibrated: not)."
        ),
        epilog=(
            "examples:\n"
            "  python -m transferlab.predict outputs/my_run photos/\n"
            "  python -m transferlab.predict outputs/my_run/checkpoints/last.ckpt 'shots/**/*.jpg' cat.png --top-k 3 --out cats.csv"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="RUN_DIR_OR_CKPT",
        help="a run dir (its best checkpoint) or a .ckpt file of a transferlab run",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders (searched recursively for .jpg, .png, ... files) or quoted glob patterns ('**' recurses)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        metavar="FILE",
        help="the CSV to write (default: predictions.csv); an existing file is kept unless --force",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=1,
        metavar="K",
        help="also list the K most probable classes (default: 1)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        metavar="N",
        help="images per forward pass (default: 64)",
    )
    parser.add_argument(
        "--uncalibrated",
        action="store_true",
        help="the model's own probabilities: do not divide the logits by the temperature a run with "
        "calibration.temperature=auto recorded in its checkpoint (applied by default)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs (default: auto, the GPU when there is one)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        predict(args)
    except UserError as error:
        exit_with(error)


def predict(args: argparse.Namespace) -> None:
    check_writable(args.out, args.force)  # before anything is loaded or read
    from transferlab.models.trained import (
        load_trained,  # heavy: imports Lightning; --help and the checks stay quick
    )

    found = find_images(args.paths)
    model_file = checkpoint_file(args.model, setting="RUN_DIR_OR_CKPT")
    check_not_an_input(args.out, "--out", [model_file, *found.files])
    trained = load_trained(model_file, setting="RUN_DIR_OR_CKPT")
    if args.top_k > len(trained.class_names):
        raise UserError(
            f"--top-k {args.top_k} is more than the model's {len(trained.class_names)} classes; use --top-k {len(trained.class_names)} or less"
        )
    calibrated = not args.uncalibrated
    rows, unreadable, read_problems = classify(
        trained, found.files, args.batch_size, args.top_k, pick_device(args.device), calibrated
    )
    skipped, problems = found.skipped + unreadable, found.problems + read_problems
    if not rows:  # one line: what is wrong with the first file, not a warning per file and then an error
        more = f", and {plural(len(problems) - 1, 'more problem')}" if len(problems) > 1 else ""
        raise UserError(
            f"nothing to predict: no readable image among the {plural(found.count(), 'file')} given "
            f"({problems[0]}{more}); give image files, or folders that hold them"
        )
    for problem in problems:  # what was skipped, said once something was predicted
        warn(f"{problem} (skipped)")
    write_csv(args.out, rows, args.top_k)
    print_table(rows, args.top_k, args.out)
    calibration = trained.calibration_line(calibrated)
    if calibration:
        print(calibration)
    print(f"{plural(len(rows), 'image')} classified by {trained.checkpoint}; predictions in {args.out}")
    if skipped:
        warn(f"{len(skipped)} of {plural(found.count(), 'file')} skipped (see the warnings above)")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def check_writable(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'predictions.csv'}")
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists; choose another --out, or add --force to overwrite it")
    check_folder_writable(out, "--out")


def warn(message: str) -> None:
    # tqdm.write keeps a running progress bar intact below the line.
    tqdm.write(f"transferlab: warning: {message}", file=sys.stderr)


# ---- which files ----------------------------------------------------------------------------
@dataclass
class FoundFiles:
    files: list[Path] = field(default_factory=list)  # to read, in the order given, each once
    skipped: list[Path] = field(default_factory=list)  # missing, or not image files
    problems: list[str] = field(default_factory=list)  # what is wrong with them, in words (warned later)

    def count(self) -> int:
        return len(self.files) + len(self.skipped)


def find_images(patterns: Sequence[str]) -> FoundFiles:
    """Files named, in folders (recursively: image extensions only, hidden files left out) or matched by globs."""
    from transferlab.data.imagefolder import IMAGE_EXTENSIONS  # heavy: transferlab.data imports Lightning

    if not any(map(_names_something, patterns)):  # one line, not a warning per path and then an error
        raise UserError(
            f"nothing to predict: no such file or folder: {', '.join(patterns)}; give image files, "
            "or folders that hold them"
        )
    found, seen = FoundFiles(), set()
    for pattern in patterns:
        for path, named in _expand(pattern, found.problems):
            if path is _MISSING:
                found.skipped.append(Path(pattern))
                continue
            if path in seen:
                continue
            seen.add(path)
            if named or path.suffix.lower() in IMAGE_EXTENSIONS:
                found.files.append(path)  # a file named on the command line is tried whatever its name
            else:
                found.problems.append(
                    f"{path} is not an image file (image files end in {', '.join(IMAGE_EXTENSIONS)})"
                )
                found.skipped.append(path)
    return found


_MISSING = Path("\0missing")


def _names_something(pattern: str) -> bool:
    path = Path(pattern).expanduser()
    return path.exists() or (glob.has_magic(pattern) and bool(glob.glob(str(path), recursive=True)))


def _expand(pattern: str, problems: list[str]) -> Iterator[tuple[Path, bool]]:
    """(file, named on the command line) for one PATH argument; notes in `problems` and yields _MISSING for nothing."""
    path = Path(pattern).expanduser()
    if path.is_file():
        yield path, True
    elif path.is_dir():
        yield from ((f, False) for f in _files_under(path, problems))
    elif glob.has_magic(pattern):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            problems.append(f"no file matches {pattern}")
            yield _MISSING, True
        for match in map(Path, matches):
            if match.is_dir():
                yield from ((f, False) for f in _files_under(match, problems))
            else:
                yield match, False
    else:
        problems.append(f"no such file or folder: {pattern}")
        yield _MISSING, True


def _files_under(folder: Path, problems: list[str]) -> list[Path]:
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if not files:
        problems.append(f"folder {folder} holds no files")
    return sorted(files)


# ---- classifying ----------------------------------------------------------------------------
@dataclass
class Prediction:
    path: Path
    classes: list[str]  # most probable first, top-k of them
    probabilities: list[float]


def classify(
    trained, files: list[Path], batch_size: int, top_k: int, device: torch.device, calibrated: bool = True
) -> tuple[list[Prediction], list[Path], list[str]]:
    """Predictions for the readable files, the files that could not be read and why, in words;
    `calibrated`: with the checkpoint's temperature, if it has one."""
    classifier = trained.classifier(calibrated).to(device)
    rows, unreadable, problems = [], [], []
    # A bar only when there is more than one batch to wait for (and only on a terminal: disable=None).
    with tqdm(
        total=len(files),
        unit="image",
        desc="predicting",
        disable=None if len(files) > batch_size else True,
        file=sys.stderr,
    ) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            images, readable, why = read_images(batch, trained.image_size)
            unreadable += [f for f in batch if f not in readable]
            problems += why
            if readable:
                with torch.inference_mode():
                    probabilities = classifier(images.to(device)).float().cpu()
                rows += predictions(readable, probabilities, trained.class_names, top_k)
            bar.update(len(batch))
    return rows, unreadable, problems


def read_images(files: list[Path], size: int) -> tuple[torch.Tensor, list[Path], list[str]]:
    """uint8 (N, 3, size, size) of the files that decode, as `data=imagefolder` reads its images, those
    files, and why each of the rest cannot be read."""
    from transferlab.data.imagefolder import decode_image  # heavy: transferlab.data imports Lightning

    images, readable, problems = [], [], []
    for file in files:
        try:
            image = decode_image(file, size)
        except UserError as error:
            problems.append(str(error))
            continue
        images.append(image)
        readable.append(file)
    stacked = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return stacked, readable, problems


def predictions(
    files: list[Path], probabilities: torch.Tensor, class_names: list[str], top_k: int
) -> list[Prediction]:
    values, indices = probabilities.topk(top_k, dim=1)
    return [
        Prediction(file, [class_names[i] for i in idx.tolist()], vals.tolist())
        for file, vals, idx in zip(files, values, indices)
    ]


# ---- output ---------------------------------------------------------------------------------
def csv_header(top_k: int) -> list[str]:
    """path, class, probability (the most probable), then class_2, probability_2, ... up to K."""
    extra = [column for rank in range(2, top_k + 1) for column in (f"class_{rank}", f"probability_{rank}")]
    return ["path", "class", "probability", *extra]


def write_csv(out: Path, rows: list[Prediction], top_k: int) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(csv_header(top_k))
    for row in rows:
        cells = [
            value for pair in zip(row.classes, (f"{p:.6f}" for p in row.probabilities)) for value in pair
        ]
        writer.writerow([str(row.path), *cells])
    try:
        write_atomically(out, lambda f: f.write(text.getvalue().encode()))
    except OSError as error:
        raise UserError(
            f"cannot write --out {out} ({error.strerror or type(error).__name__}); choose another --out"
        ) from None


def print_table(rows: list[Prediction], top_k: int, out: Path) -> None:
    shown = rows[:TABLE_ROWS]
    header = ["path", "class", "probability"] + ([f"next {top_k - 1}"] if top_k > 1 else [])
    lines = [
        [str(r.path), r.classes[0], f"{r.probabilities[0]:.3f}"]
        + (
            [", ".join(f"{c} {p:.3f}" for c, p in zip(r.classes[1:], r.probabilities[1:]))]
            if top_k > 1
            else []
        )
        for r in shown
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    for cells in [header, *lines]:
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    if len(rows) > len(shown):
        print(f"... {len(rows) - len(shown)} more rows in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
