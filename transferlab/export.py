"""`python -m transferlab.export RUN_DIR_OR_CKPT --format onnx|torchscript [--out FILE]`.

The exported model carries its preprocessing: it takes uint8 RGB images (N, 3, S, S) at the
run's image size S, divides by 255, normalizes with the run's mean and std, runs the network
and returns class probabilities (N, classes). The class names, in output order, and this
interface go beside it in `FILE.classes.json`. Before anything is written, the exported model
is run on random images and must give the PyTorch model's probabilities (max abs difference
<= 1e-4; ONNX is checked with onnxruntime when it is installed). A checkpoint of a run calibrated
with `calibration.temperature=auto` records a temperature: the exported model divides its logits by
it before the softmax (`--uncalibrated`: not), and the class file says which (`temperature`).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from transferlab.cli.args import CommandLine, check_folder_writable, check_not_an_input
from transferlab.store.files import write_atomically
from transferlab.store.rundir import checkpoint_file
from transferlab.utils.errors import UserError, exit_with

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: what the exported model may differ from the PyTorch one by, in probability
TOLERANCE = 1e-4
ONNX_OPSET = 17


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandLine(
        prog="python -m transferlab.export",
        description=(
            "Export a trained transferlab model with its preprocessing inside: input uint8 RGB images\n"
            "(N x 3 x S x S, S the run's image size, values 0..255), output class probabilities\n"
            "(N x classes). The class names, in output order, and the preprocessing are written\n"
            "beside it to FILE.classes.json. The export is checked against PyTorch before it is written.\n"
            "A run calibrated with calibration.temperature=auto divides its logits by its temperature\n"
            "(--uncalibrated: not)."
        ),
        epilog=(
            "examples:\n"
            "  python -m transferlab.export outputs/my_run --format onnx                 # model.onnx, model.onnx.classes.json\n"
            "  python -m transferlab.export outputs/my_run --format torchscript --out my_run.pt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="RUN_DIR_OR_CKPT",
        help="a run dir (its best checkpoint) or a .ckpt file of a transferlab run",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=tuple(FORMATS),
        help="onnx (dynamic batch axis) or torchscript (traced)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="the file to write (default: model.onnx or model.pt in the current folder)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument(
        "--uncalibrated",
        action="store_true",
        help="export the model's own probabilities: without the temperature a run with "
        "calibration.temperature=auto recorded in its checkpoint (applied by default)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = args.out or Path(f"model{FORMATS[args.format]}")
        export(args.model, args.format, out, args.force, calibrated=not args.uncalibrated)
    except UserError as error:
        exit_with(error)


def classes_file(out: Path) -> Path:
    return out.with_name(out.name + ".classes.json")


def export(model: str, fmt: str, out: Path, force: bool, calibrated: bool = True) -> None:
    """`calibrated`: the exported probabilities are divided by the checkpoint's temperature, if it has one."""
    targets = (out, classes_file(out))
    check_writable(targets, force)  # before anything is loaded
    if fmt == "onnx":
        check_onnx_installed()
    from transferlab.models.trained import (
        load_trained,  # heavy: imports Lightning; --help and the checks above stay quick
    )

    model_file = checkpoint_file(model, setting="RUN_DIR_OR_CKPT")
    for target in targets:
        check_not_an_input(target, "--out", [model_file])
    trained = load_trained(model_file, setting="RUN_DIR_OR_CKPT")
    classifier = trained.classifier(calibrated)
    example = torch.randint(0, 256, (2, 3, trained.image_size, trained.image_size), dtype=torch.uint8)
    exported = (to_onnx if fmt == "onnx" else to_torchscript)(classifier, example)
    difference = check_parity(fmt, exported, classifier, trained.image_size)
    write_file(out, lambda f: f.write(exported))
    described = trained.describe(calibrated)
    write_file(targets[1], lambda f: f.write(json.dumps(described, indent=2).encode() + b"\n"))
    size = trained.image_size
    print(
        f"wrote {out}: {fmt}, input images uint8 N x 3 x {size} x {size} (RGB, 0..255), output probabilities N x {len(trained.class_names)}"
    )
    print(
        f"wrote {targets[1]}: the {len(trained.class_names)} class names in output order, and the preprocessing"
    )
    print(f"precision: {trained.precision_line()}")
    calibration = trained.calibration_line(calibrated)
    if calibration:
        print(calibration)
    print(
        f"checked: max |probability difference| vs PyTorch {difference:.1e} on 8 random images"
        if difference is not None
        else "not checked against PyTorch: onnxruntime is not installed (pip install onnxruntime)"
    )


def check_writable(targets: Sequence[Path], force: bool) -> None:
    for target in targets:
        if target.is_dir():
            raise UserError(f"--out: {target} is a folder; give a file name")
        if target.exists() and not force:
            raise UserError(f"{target} already exists; choose another --out, or add --force to overwrite it")
    check_folder_writable(targets[0], "--out")  # before the export, not after it


def check_onnx_installed() -> None:
    if importlib.util.find_spec("onnx") is None:
        raise UserError(
            "--format onnx needs the onnx package: pip install onnx onnxruntime (or use --format torchscript)"
        )


# ---- the formats --------------------------------------------------------------------------------
def to_onnx(classifier: torch.nn.Module, example: torch.Tensor) -> bytes:
    """ONNX bytes through torch's TorchScript-based exporter (it needs no onnxscript), batch axis dynamic."""
    buffer = io.BytesIO()
    with quiet_tracing():
        torch.onnx.export(
            classifier,
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    return buffer.getvalue()


def to_torchscript(classifier: torch.nn.Module, example: torch.Tensor) -> bytes:
    """A traced TorchScript module's bytes (torch.jit.load reads them); it runs any batch size."""
    buffer = io.BytesIO()
    with quiet_tracing():
        traced = torch.jit.trace(classifier, example)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """torch's deprecation notices for its tracers, and the tracer's warnings about shapes it
    turns into constants (the image size is fixed, only the batch varies), mean nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        yield


# ---- checking before writing ---------------------------------------------------------------
def check_parity(fmt: str, exported: bytes, classifier: torch.nn.Module, image_size: int) -> float | None:
    """Max |difference| between the exported model's and PyTorch's probabilities on random images
    (a batch size other than the example's: the batch axis must really be free); refuses beyond TOLERANCE.
    None when ONNX cannot be run here (no onnxruntime)."""
    images = torch.randint(
        0, 256, (8, 3, image_size, image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        expected = classifier(images)
    run = run_onnx if fmt == "onnx" else run_torchscript
    got = run(exported, images)
    if got is None:
        return None
    difference = float((got - expected).abs().max())
    if not difference <= TOLERANCE:
        raise UserError(
            f"the exported {fmt} model's probabilities differ from PyTorch's by {difference:.2e} (more than {TOLERANCE}); "
            f"nothing written. Try the other --format, and report this with the model's backbone"
        )
    return difference


def run_onnx(exported: bytes, images: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime  # optional: the onnx extra; without it the export is not checked
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def run_torchscript(exported: bytes, images: torch.Tensor) -> torch.Tensor:
    with quiet_tracing():
        module = torch.jit.load(io.BytesIO(exported), map_location="cpu")
    with torch.inference_mode():
        return module(images)


def write_file(path: Path, write: Callable) -> None:
    try:
        write_atomically(path, write)
    except OSError as error:
        raise UserError(
            f"cannot write {path} ({error.strerror or type(error).__name__}); choose another --out"
        ) from None


if __name__ == "__main__":
    main(sys.argv[1:])
