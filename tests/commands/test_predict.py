"""`python -m transferlab.predict`: a trained run classifies new images, through the real command line.

One tiny cnn_small run is trained once per session (conftest's `cnn_run`, shared with test_export.py).
Expected predictions are not written down: they are the model's own forward pass on the same
images, prepared by hand from what the checkpoint records.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli


#: a cnn_small run on the tiny CIFAR-10: a few batches are enough, the weights only need to be trained ones
def write_photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """RGB PNGs of the given (height, width): not square, not at the run's size, so they are resized and cropped."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"photo_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def expected_probabilities(run_dir: Path, files: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """The trained model's softmax on `files`, each decoded as data=imagefolder does and normalized with
    the checkpoint's recorded mean/std (independent of transferlab.models.trained)."""
    from transferlab.data.imagefolder import decode_image
    from transferlab.models import TransferModule

    model = TransferModule.load_from_checkpoint(run_dir).eval()
    data = model.data_info
    images = torch.stack([decode_image(f, data["image_size"]) for f in files]).float() / 255.0
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images - mean) / std).softmax(dim=1), data["class_names"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("transferlab: error:")]


def test_predicts_a_folder_skipping_unreadable_files(cnn_run, tmp_path, torch_home):
    photos = write_photos(tmp_path / "photos", [(40, 50), (32, 32), (70, 33), (20, 90), (64, 64)])
    photos += write_photos(tmp_path / "photos" / "more", [(36, 36)], seed=1)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "photos" / "notes.txt").write_text("not an image\n")
    out = tmp_path / "preds.csv"

    # Batches of 2: several forward passes, one with the corrupt file in it.
    result = cli(
        [str(cnn_run), str(tmp_path / "photos"), "--top-k", "3", "--batch-size", "2", "--out", str(out)],
        tmp_path,
        torch_home,
        module="transferlab.predict",
    )

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("transferlab: warning:")]
    assert len(warnings) == 3, result.stderr  # one per skipped file, then the count
    assert "broken.png" in warnings[0] + warnings[1] and "notes.txt" in warnings[0] + warnings[1]
    assert "2 of 8 files skipped" in warnings[2]
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == [
        "path",
        "class",
        "probability",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
    ]
    assert sorted(Path(r["path"]) for r in rows) == sorted(photos)

    expected, class_names = expected_probabilities(cnn_run, [Path(r["path"]) for r in rows])
    values, indices = expected.topk(3, dim=1)
    for row, probs, idx in zip(rows, values.tolist(), indices.tolist()):
        assert [row["class"], row["class_2"], row["class_3"]] == [class_names[i] for i in idx]
        got = [float(row["probability"]), float(row["probability_2"]), float(row["probability_3"])]
        assert got == pytest.approx(probs, abs=2e-6)  # the CSV's 6 decimals
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["path", "class", "probability"]
    assert all(any(r["path"] in line and r["class"] in line for line in table) for r in rows)


@pytest.mark.slow
def test_nothing_readable_is_one_error_line_and_no_file(cnn_run, tmp_path, torch_home):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "broken.jpg").write_bytes(b"no jpeg")
    (tmp_path / "junk" / "readme.md").write_text("# not an image\n")

    result = cli(
        [str(cnn_run), str(tmp_path / "junk"), "missing.png"],
        tmp_path,
        torch_home,
        module="transferlab.predict",
    )

    assert result.returncode == 2
    # one line in all: no warning per file before it (the line names the first problem and counts the rest)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == error_lines(result.stderr) and len(lines) == 1, result.stderr
    assert "nothing to predict: no readable image among the 3 files given" in lines[0]
    assert "readme.md is not an image file" in lines[0] and "and 2 more problems" in lines[0]
    assert not (tmp_path / "predictions.csv").exists()

    only_broken = cli([str(cnn_run), str(tmp_path / "junk" / "broken.jpg")], tmp_path, torch_home,
                      module="transferlab.predict")  # fmt: skip
    lines = [line for line in only_broken.stderr.splitlines() if line.strip()]
    assert only_broken.returncode == 2 and len(lines) == 1, only_broken.stderr
    assert "cannot read image" in lines[0] and "broken.jpg" in lines[0] and "more" not in lines[0]


@pytest.mark.parametrize("paths", [["missing.png"], ["missing.png", "nowhere", "*.nomatch"]])
def test_paths_that_name_nothing_are_one_line_before_the_model_is_read(paths, tmp_path):
    from transferlab.predict import find_images
    from transferlab.utils.errors import UserError

    with pytest.raises(UserError) as refused:
        find_images([str(tmp_path / p) for p in paths])
    message = str(refused.value)
    assert message.startswith("nothing to predict: no such file or folder:") and "\n" not in message
    assert all(p in message for p in paths)


def _foreign_lightning_checkpoint(folder: Path, cnn_run: Path) -> Path:
    checkpoint = torch.load(cnn_run / "checkpoints" / "last.ckpt", weights_only=False)
    del checkpoint["transferlab"]
    torch.save(checkpoint, folder / "other.ckpt")
    return folder / "other.ckpt"


def _checkpoint_without_architecture(folder: Path, cnn_run: Path) -> Path:
    """As written before checkpoints recorded how to rebuild their network."""
    checkpoint = torch.load(cnn_run / "checkpoints" / "last.ckpt", weights_only=False)
    del checkpoint["transferlab"]["architecture"]
    torch.save(checkpoint, folder / "old.ckpt")
    return folder / "old.ckpt"


# (id, how to make the model argument, extra arguments, what the one line says)
BAD_INPUTS = [
    (
        "run-dir-without-checkpoints",
        lambda d, run: d.mkdir() or d,
        [],
        "is a folder without checkpoints/best-*.ckpt or last.ckpt",
    ),
    ("not-a-checkpoint", lambda d, run: (d.write_text("hello"), d)[1], [], "is not a readable checkpoint"),
    (
        "not-transferlab",
        lambda d, run: _foreign_lightning_checkpoint(d.parent, run),
        [],
        "is not a transferlab checkpoint",
    ),
    (
        "no-architecture-record",
        lambda d, run: _checkpoint_without_architecture(d.parent, run),
        [],
        "did not record its architecture",
    ),
    (
        "top-k-above-classes",
        lambda d, run: run,
        ["--top-k", "11"],
        "--top-k 11 is more than the model's 10 classes",
    ),
    (
        "run-dir-with-a-broken-last-ckpt",
        lambda d, run: _run_dir_with_empty_last(d),
        [],
        "checkpoints/last.ckpt is not a readable checkpoint",
    ),
]


def _run_dir_with_empty_last(run_dir: Path) -> Path:
    """A run killed while its first last.ckpt was written by something that does not write atomically."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_model, extra, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_model_or_option_is_one_line(cnn_run, tmp_path, torch_home, make_model, extra, message):
    model = make_model(tmp_path / "model_arg", cnn_run)
    write_photos(tmp_path / "photos", [(32, 32)])

    result = cli(
        [str(model), str(tmp_path / "photos"), *extra], tmp_path, torch_home, module="transferlab.predict"
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == error_lines(result.stderr), result.stderr
    assert message in result.stderr
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.slow
def test_existing_csv_is_kept(cnn_run, tmp_path, torch_home):
    write_photos(tmp_path / "photos", [(32, 32)])
    (tmp_path / "predictions.csv").write_text("mine\n")

    result = cli([str(cnn_run), str(tmp_path / "photos")], tmp_path, torch_home, module="transferlab.predict")

    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "transferlab: error: --out predictions.csv already exists; choose another --out, or add --force to overwrite it"
    ]
    assert (tmp_path / "predictions.csv").read_text() == "mine\n"


def test_help_and_usage_errors(capsys):
    from transferlab.predict import parse_args

    with pytest.raises(SystemExit) as help_exit:
        parse_args(["--help"])
    assert help_exit.value.code == 0
    help_text = capsys.readouterr().out
    assert all(
        option in help_text for option in ("RUN_DIR_OR_CKPT", "--top-k", "--batch-size", "--out", "glob")
    )
    with pytest.raises(SystemExit) as usage_exit:
        parse_args(["run", "photos", "--batch-size", "0"])
    assert usage_exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "transferlab: error: argument --batch-size: 0 must be at least 1 (see python -m transferlab.predict --help)"
    ]


# ---- an --out that cannot be written, or is something the command reads -------------------
def _out_under_a_file(tmp_path: Path, photo: Path, run: Path) -> tuple[list[str], str]:
    return [
        "--out",
        str(photo / "preds.csv"),
    ], f"cannot write --out {photo / 'preds.csv'}: {photo} is a file, not a folder"


def _out_is_an_input_image(tmp_path: Path, photo: Path, run: Path) -> tuple[list[str], str]:
    return [
        "--out",
        str(photo),
        "--force",
    ], f"--out {photo} would overwrite {photo}, which this command reads"


def _out_is_the_checkpoint(tmp_path: Path, photo: Path, run: Path) -> tuple[list[str], str]:
    checkpoint = tmp_path / "copy.ckpt"
    checkpoint.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    return ["--out", str(checkpoint), "--force"], f"would overwrite {checkpoint}, which this command reads"


BAD_OUT = [
    ("under-a-file", _out_under_a_file),
    ("an-input-image", _out_is_an_input_image),
    ("the-checkpoint", _out_is_the_checkpoint),
]


@pytest.mark.slow
@pytest.mark.parametrize("make_out", [c[1] for c in BAD_OUT], ids=[c[0] for c in BAD_OUT])
def test_an_out_that_cannot_or_must_not_be_written_is_one_line_before_anything_is_classified(
    cnn_run, tmp_path, torch_home, make_out
):
    (photo,) = write_photos(tmp_path / "photos", [(32, 32)])
    extra, message = make_out(tmp_path, photo, cnn_run)
    model = extra[1] if extra[1].endswith(".ckpt") else str(cnn_run)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    result = cli([model, str(photo), *extra], tmp_path, torch_home, module="transferlab.predict")

    assert result.returncode == 2
    assert error_lines(result.stderr) == [result.stderr.strip()], result.stderr
    assert message in result.stderr
    assert {
        p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    } == before  # nothing of the user's touched


@pytest.mark.slow
def test_a_read_only_out_folder_is_one_line_before_anything_is_classified(cnn_run, tmp_path, torch_home):
    """A real read-only bind mount (root can write into a chmod-ed folder; needs root to mount)."""
    import subprocess

    (photo,) = write_photos(tmp_path / "photos", [(32, 32)])
    mount_point = tmp_path / "read_only"
    mount_point.mkdir()
    if subprocess.run(
        ["mount", "--bind", "-o", "ro", str(tmp_path / "photos"), str(mount_point)], capture_output=True
    ).returncode:
        pytest.skip("cannot make a read-only bind mount here (not root)")
    try:
        result = cli(
            [str(cnn_run), str(photo), "--out", str(mount_point / "sub" / "preds.csv")],
            tmp_path,
            torch_home,
            module="transferlab.predict",
        )
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"transferlab: error: cannot write --out {mount_point / 'sub' / 'preds.csv'} (Read-only file system at {mount_point}); choose another --out"
    ], result.stderr


@pytest.mark.slow
def test_an_animated_gif_is_classified_by_its_first_frame(cnn_run, tmp_path, torch_home):
    from PIL import Image

    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    # What the first frame looks like once stored as a GIF (palette quantized): PIL's own reading of it
    with Image.open(tmp_path / "moving.gif") as gif:
        gif.convert("RGB").save(tmp_path / "first_frame.png")
    out = tmp_path / "preds.csv"

    result = cli(
        [
            str(cnn_run),
            str(tmp_path / "moving.gif"),
            str(tmp_path / "first_frame.png"),
            "--top-k",
            "10",
            "--out",
            str(out),
        ],
        tmp_path,
        torch_home,
        module="transferlab.predict",
    )

    assert result.returncode == 0, result.stderr
    gif_row, frame_row = list(csv.reader(out.open()))[1:]
    assert gif_row[1:] == frame_row[1:]


@pytest.mark.parametrize("name", ["checkpoints/last.ckpt", "metrics.json", ".hydra/config.yaml"])
def test_force_never_overwrites_a_file_of_the_run_it_reads(name, tmp_path):
    from transferlab.cli.args import check_not_an_input
    from transferlab.utils.errors import UserError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    best = run / "checkpoints" / "best-epoch000.ckpt"
    for path in (best, run / name, run / "predictions.csv"):
        path.write_text("x")
    with pytest.raises(UserError, match="would overwrite a file of the run"):
        check_not_an_input(run / name, "--out", [best])
    check_not_an_input(run / "predictions.csv", "--out", [best])  # an earlier prediction may be replaced
    assert (run / name).read_text() == "x"
