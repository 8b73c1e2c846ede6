"""Data the user hands us, trusted only after checking: splits, folder layouts, class lists,
CIFAR files and archives, 16-bit images, loader settings.

Each class of defect is tested over its cases in-process against the data modules; one case
per class goes through the real command line, where the user meets it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cifar10_datamodule, run_training
from fakedata import write_cifar10, write_png16
from test_cli_errors import BASE, cli, nonempty_lines

from transferlab import CIFAR10DataModule
from transferlab.data import ImageFolderDataModule
from transferlab.data.subsets import Split, class_list, select_classes, split_train_val, stratified_counts
from transferlab.utils.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


cifar10 = cifar10_datamodule  # the shared helper, under the short name these tests use


def imagefolder(root, **kwargs) -> ImageFolderDataModule:
    kwargs.setdefault("image_size", 8)
    kwargs.setdefault("val_size", 0)
    kwargs.setdefault("test_size", 0)
    kwargs.setdefault("stats_cache", False)
    dm = ImageFolderDataModule(root=str(root), **kwargs)
    dm.setup("fit")
    return dm


def write_images(folder: Path, classes: dict[str, int], size: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                folder / name / f"{i:03d}.png"
            )
    return folder


def counts(labels: torch.Tensor, n: int) -> list[int]:
    return torch.bincount(labels, minlength=n).tolist()


def one_line_refusal(args: list[str], cwd: Path, torch_home: Path) -> str:
    """Run the CLI, check it refused in one line before training, return that line."""
    result = cli([*BASE, *args, "hydra.run.dir=run"], cwd, torch_home)
    lines = nonempty_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("transferlab: error: ")
    assert not (cwd / "run" / "checkpoints").exists()
    return lines[0]


# ---- 1. the held-out splits are stratified and seeded ----------------------------------------
@pytest.mark.parametrize(
    "sizes, size, expected",
    [
        ([100] * 10, 100, [10] * 10),  # balanced stays exactly balanced
        ([20, 10], 6, [4, 2]),  # in proportion
        ([7, 7, 7], 4, [2, 1, 1]),  # the remainder goes to the earlier class
        ([50, 3], 4, [3, 1]),  # a small class still gets one (its share rounds to 0)
        ([5, 5, 5], 2, [1, 1, 0]),  # fewer than one per class: some classes give none
        ([30, 2], 30, [29, 1]),  # every class keeps one training image
    ],
)
def test_held_out_counts_are_proportional_and_exact(sizes, size, expected):
    assert stratified_counts(sizes, size, "data.val_size", [f"c{i}" for i in range(len(sizes))]) == expected


@pytest.mark.parametrize(
    "sizes, size, message",
    [
        (
            [30, 1],
            2,
            "data.val_size=2 holds out at least one image of every class, but class 'c1' has only 1",
        ),
        (
            [30, 2],
            31,
            "data.val_size=31 leaves no training images for some classes: the split has 32 images in 2 classes; use data.val_size <= 30",
        ),
        ([3, 3], 6, "data.val_size=6 leaves no training images: the split has 6"),
    ],
)
def test_impossible_held_out_sizes_are_refused(sizes, size, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        stratified_counts(sizes, size, "data.val_size", [f"c{i}" for i in range(len(sizes))])


def test_validation_split_is_stratified_seeded_and_fewshot_independent(tmp_path):
    root = write_cifar10(tmp_path, per_class_train=100, per_class_test=2)
    full = cifar10(root, val_size=100)
    assert counts(full.train.labels, 10) == [90] * 10 and counts(full.val.labels, 10) == [10] * 10
    fewshot = cifar10(root, val_size=100, fewshot={"fraction": 0.1})
    assert counts(fewshot.train.labels, 10) == [9] * 10
    assert torch.equal(fewshot.val.positions, full.val.positions)  # validated on the same images
    assert torch.equal(cifar10(root, val_size=100, seed=5).val.positions, full.val.positions)
    assert not torch.equal(cifar10(root, val_size=100, split_seed=1).val.positions, full.val.positions)


def test_split_keeps_every_image_exactly_once():
    labels = torch.arange(3).repeat_interleave(torch.tensor([40, 7, 13]))
    split = Split(torch.zeros(len(labels), 1), labels, torch.arange(len(labels)) + 1000)
    train, val = split_train_val(split, 12, seed=3)
    assert sorted(train.positions.tolist() + val.positions.tolist()) == split.positions.tolist()
    assert counts(val.labels, 3) == [8, 1, 3]


def test_imagefolder_small_class_is_validated_and_tested(tmp_path):
    write_images(tmp_path / "pics", {"many": 30, "few": 3})
    dm = imagefolder(tmp_path / "pics", val_size=2, test_size=2)
    assert counts(dm.val.labels, 2) == [1, 1] and counts(dm.test.labels, 2) == [1, 1]
    assert dm.class_names == ["few", "many"] and counts(dm.train.labels, 2) == [1, 28]


def test_imagefolder_impossible_split_is_refused_before_decoding(tmp_path, monkeypatch):
    write_images(tmp_path / "pics", {"many": 30, "one": 1})

    def no_decoding(*args, **kwargs):
        raise AssertionError("images decoded before the split sizes were checked")

    monkeypatch.setattr("transferlab.data.imagefolder.decode_image", no_decoding)
    with pytest.raises(
        UserError,
        match="data.val_size=2 holds out at least one image of every class, but class 'one' has only 1",
    ):
        imagefolder(tmp_path / "pics", val_size=2)


# ---- 2. image folders with train/ valid/ test/ ---------------------------------------------
@pytest.mark.parametrize(
    "val_name, test_name", [("val", "test"), ("valid", "test"), ("validation", "testing")]
)
def test_imagefolder_accepts_common_split_names(tmp_path, val_name, test_name):
    write_images(tmp_path / "data" / "train", {"a": 6, "b": 6})
    write_images(tmp_path / "data" / val_name, {"a": 2, "b": 2})
    write_images(tmp_path / "data" / test_name, {"a": 3, "b": 3})
    dm = imagefolder(tmp_path / "data", val_size=500, test_size=500)  # sizes unused: the folders win
    assert (len(dm.train), len(dm.val), len(dm.test)) == (12, 4, 6)


@pytest.mark.parametrize(
    "folders, message",
    [
        (["train", "val", "valid"], "has both val/ and valid/ as the val split; keep one of them"),
        (["train", "test", "testing"], "has both test/ and testing/ as the test split"),
        (["train", "dev", "test"], "has split folders (test/, train/) and also dev/, which would be ignored"),
        (["train", "validation", "extra_cats"], "and also extra_cats/, which would be ignored"),
        (["valid", "test"], "has test/, valid/ but no train/ folder"),
    ],
)
def test_imagefolder_layout_that_would_ignore_images_is_refused(tmp_path, folders, message):
    for folder in folders:
        write_images(tmp_path / "data" / folder, {"a": 2, "b": 2}, size=4)
    with pytest.raises(UserError, match=re.escape(message)):
        imagefolder(tmp_path / "data")


# ---- 3. a classifier needs two classes; a string is a class name -----------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        ("cat", ["cat"]),
        ("cat,dog", ["cat", "dog"]),
        (" cat , dog ", ["cat", "dog"]),
        (3, [3]),
        (["cat", 0], ["cat", 0]),
        ("", []),
        (None, None),
    ],
)
def test_class_list_reads_a_string_as_names_not_letters(value, expected):
    assert class_list(value) == expected


@pytest.mark.parametrize(
    "classes, message",
    [
        (["cat"], "data.classes keeps only the class 'cat'; a classifier needs at least two"),
        ("cat", "data.classes keeps only the class 'cat'"),
        (3, "data.classes keeps only the class 'cat'"),
        ("", "data.classes is empty"),
    ],
)
def test_one_class_is_refused(cifar10_root, classes, message):
    with pytest.raises(UserError, match=message):
        cifar10(cifar10_root, classes=classes)


def test_comma_separated_classes_are_two_classes(cifar10_root):
    dm = cifar10(cifar10_root, classes="cat,dog", val_size=10)
    assert dm.class_names == ["cat", "dog"] and set(dm.train.labels.tolist()) == {0, 1}


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_imagefolder_with_one_class_is_refused(tmp_path, layout):
    root = tmp_path / "data"
    write_images(root / "train" if layout == "split" else root, {"only": 4})
    with pytest.raises(UserError, match="has only the class 'only'; a classifier needs at least two classes"):
        imagefolder(root)


def test_names_list_of_one_is_refused():
    with pytest.raises(UserError, match="the dataset has only the class 'x'"):
        select_classes(["x"], None)


# ---- 4. CIFAR files: labels, names, Python 3 pickles -----------------------------------------
def _copy_cifar(source: Path, target: Path) -> Path:
    shutil.copytree(source / "cifar-10-batches-py", target / "cifar-10-batches-py")
    return target / "cifar-10-batches-py"


def _rewrite(path: Path, change) -> None:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    change(entry)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _set_label(value):
    def change(entry):
        entry[b"labels"][0] = value

    return change


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("data_batch_2", _set_label(-1), r"data_batch_2 has label -1 \(1 of 60 labels are outside 0..9"),
        ("data_batch_4", _set_label(10), r"data_batch_4 has label 10 \(1 of 60 labels are outside 0..9"),
        ("test_batch", _set_label(12), r"test_batch has label 12 .* outside 0..9"),
        (
            "batches.meta",
            lambda e: e[b"label_names"].append(b"unicorn"),
            r"batches.meta names 11 classes but the training files have no image of 'unicorn'",
        ),
        ("batches.meta", lambda e: e[b"label_names"].pop(), r"data_batch_1 has label 9 .* outside 0..8"),
    ],
)
def test_cifar_files_that_disagree_are_refused(cifar10_root, tmp_path, file, change, message):
    folder = _copy_cifar(cifar10_root, tmp_path)
    _rewrite(folder / file, change)
    with pytest.raises(UserError, match=message):
        cifar10(tmp_path)


def test_cifar_pickles_with_str_keys_are_read(cifar10_root, tmp_path):
    """What a Python 3 script writes when it re-saves the files (torchvision reads them too)."""
    folder = _copy_cifar(cifar10_root, tmp_path)
    for path in folder.iterdir():
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        py3 = {key.decode(): value for key, value in entry.items()}
        if "label_names" in py3:
            py3["label_names"] = [n.decode() for n in py3["label_names"]]
        with open(path, "wb") as f:
            pickle.dump(py3, f)  # the default protocol, str keys and str names
    original, rewritten = cifar10(cifar10_root), cifar10(tmp_path)
    assert rewritten.class_names == CIFAR10_NAMES
    assert torch.equal(rewritten.train.images, original.train.images)
    assert torch.equal(rewritten.test.labels, original.test.labels)


# ---- 5. archives: extracted whole or not at all ------------------------------------------------
def _archive(cifar10_root: Path, path: Path, leave_out: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted((cifar10_root / "cifar-10-batches-py").iterdir()):
            if file.name != leave_out:
                tar.add(file, arcname=f"cifar-10-batches-py/{file.name}")
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "the archive is damaged or incomplete: delete it and download it again"),
        ("missing-file", "is not the official cifar10 archive (it lacks data_batch_3)"),
        ("not-gzip", "the archive is damaged or incomplete"),
    ],
)
def test_bad_archive_leaves_nothing_and_a_good_one_then_works(cifar10_root, tmp_path, damage, message):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _archive(cifar10_root, archive, leave_out="data_batch_3" if damage == "missing-file" else None)
    if damage == "truncated":
        _truncate(archive)
    elif damage == "not-gzip":
        archive.write_text("<html>rate limited</html>")
    with pytest.raises(UserError, match=re.escape(message)):
        cifar10(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # no partial folder, no scratch
    _archive(cifar10_root, archive)  # the user replaces the archive
    assert len(cifar10(tmp_path).test) == 100


@pytest.mark.parametrize("left", [["data_batch_1"], [], ["data_batch_1", "data_batch_2", "batches.meta"]])
def test_incomplete_folder_is_extracted_again_from_the_archive(cifar10_root, tmp_path, left):
    """What older versions left after an interrupted extraction."""
    _archive(cifar10_root, tmp_path / "cifar-10-python.tar.gz")
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in left:
        shutil.copy(cifar10_root / "cifar-10-batches-py" / name, tmp_path / "cifar-10-batches-py" / name)
    dm = cifar10(tmp_path)
    assert len(dm.train) + len(dm.val) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_incomplete_folder_without_archive_names_the_missing_file(cifar10_root, tmp_path):
    folder = _copy_cifar(cifar10_root, tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(UserError, match="data_batch_5 is missing"):
        cifar10(tmp_path)


# ---- 6. 16-bit images ------------------------------------------------------------------------
def _ramp16(shape) -> np.ndarray:
    return np.linspace(0, 65535, int(np.prod(shape))).astype(np.uint16).reshape(shape)


def _grey_pil(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path)  # uint16 (H, W): PIL mode I;16


@pytest.mark.parametrize(
    "suffix, shape, write",
    [
        (".png", (8, 8), _grey_pil),  # 16-bit grey PNG, written by PIL
        (".tif", (8, 8), _grey_pil),  # 16-bit grey TIFF (torchvision cannot decode it: PIL path)
        (".png", (8, 8, 3), write_png16),  # 48-bit RGB PNG
    ],
)
def test_sixteen_bit_images_are_scaled_to_uint8(tmp_path, suffix, shape, write):
    pixels = _ramp16(shape)
    for name in ("a", "b"):
        (tmp_path / "pics" / name).mkdir(parents=True)
        write(tmp_path / "pics" / name / f"img{suffix}", pixels)
    dm = imagefolder(tmp_path / "pics", image_size=8, normalization="none")
    expected = torch.from_numpy((pixels >> 8).astype(np.uint8))
    expected = expected.permute(2, 0, 1) if expected.ndim == 3 else expected.expand(3, -1, -1)
    assert dm.train.images.dtype == torch.uint8
    assert torch.equal(dm.train.images[0], expected)


# ---- 7. num_workers ---------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [-1, 1.5, "two", True, None])
def test_bad_num_workers_is_refused_by_the_data_module(workers):
    with pytest.raises(UserError, match=rf"data.num_workers={workers!r} must be an integer >= 0"):
        CIFAR10DataModule(root="unused", num_workers=workers)


# ---- 8. a last training batch of one image ----------------------------------------------------
@pytest.mark.parametrize(
    "train_size, batch_size, dropped",
    [(81, 16, True), (80, 16, False), (95, 16, False), (17, 16, True), (16, 16, False)],
)
def test_only_a_last_batch_of_one_is_dropped(train_size, batch_size, dropped):
    dm = CIFAR10DataModule(root="unused", batch_size=batch_size)
    dm.train = Split(
        torch.zeros(train_size, 3, 2, 2, dtype=torch.uint8),
        torch.zeros(train_size, dtype=torch.long),
        torch.arange(train_size),
    )
    sizes = [len(labels) for _, labels in dm.train_dataloader()]
    assert sum(sizes) == train_size - dropped and min(sizes) > 1


def test_mlp_head_trains_when_the_last_batch_would_hold_one_image(cifar10_root, tmp_path, one_thread):
    # 300 - 50 validation = 250 training images = 3 x 83 + 1
    overrides = [
        f"data.root={cifar10_root}",
        *BASE,
        "head=mlp",
        "data.batch_size=83",
        "mode=scratch",
        "trainer.limit_val_batches=1",
    ]
    metrics = run_training(overrides, tmp_path / "run")
    assert metrics["epochs"] == 1 and np.isfinite(metrics["test/loss"])


# ---- through the command line -------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_roots(cifar10_root, tmp_path_factory) -> dict[str, Path]:
    """One bad data folder per class of defect that the command line meets."""
    base = tmp_path_factory.mktemp("bad_roots")
    roots = {"cifar": cifar10_root, "bad_labels": base / "bad_labels", "truncated": base / "truncated"}
    _rewrite(_copy_cifar(cifar10_root, roots["bad_labels"]) / "data_batch_1", _set_label(10))
    roots["truncated"].mkdir()
    _truncate(_archive(cifar10_root, roots["truncated"] / "cifar-10-python.tar.gz"))
    roots["two_vals"] = base / "two_vals"
    for folder in ("train", "val", "valid"):
        write_images(roots["two_vals"] / folder, {"a": 2, "b": 2}, size=4)
    roots["one_class"] = write_images(base / "one_class", {"cats": 3}, size=4)
    return roots


# (id, arguments ({name} is a folder from `bad_roots`), text the one line must contain)
CLI_CASES = [
    (
        "one-class-as-string",
        ["data.root={cifar}", "data.classes=cat"],
        "data.classes keeps only the class 'cat'; a classifier needs at least two",
    ),
    (
        "negative-workers",
        ["data.root={cifar}", "data.num_workers=-1"],
        "data.num_workers=-1 must be an integer >= 0",
    ),
    (
        "label-out-of-range",
        ["data.root={bad_labels}"],
        "{bad_labels}/cifar-10-batches-py/data_batch_1 has label 10",
    ),
    (
        "truncated-archive",
        ["data.root={truncated}", "data.download=false"],
        "cannot extract {truncated}/cifar-10-python.tar.gz",
    ),
    (
        "val-and-valid",
        ["data=imagefolder", "data.root={two_vals}"],
        "has both val/ and valid/ as the val split",
    ),
    (
        "imagefolder-one-class",
        ["data=imagefolder", "data.root={one_class}"],
        "has only the class 'cats'; a classifier needs at least two classes",
    ),
]


@pytest.mark.parametrize(
    "args, expected",
    [
        pytest.param(*c[1:], id=c[0], marks=() if c[0] == "one-class-as-string" else pytest.mark.slow)
        for c in CLI_CASES
    ],
)  # a real process each: one in the fast tier
def test_bad_data_is_refused_in_one_line(bad_roots, tmp_path, torch_home, args, expected):
    line = one_line_refusal([a.format(**bad_roots) for a in args], tmp_path, torch_home)
    assert expected.format(**bad_roots) in line, line
    assert sorted(p.name for p in bad_roots["truncated"].iterdir()) == ["cifar-10-python.tar.gz"]


# ---- the image-folder statistics cache: keyed by content, written whole, never fatal ----------
def write_flat_images(folder: Path, value: int, size: int = 6) -> Path:
    """Two classes of two images each, every pixel `value`: a known mean of value/255."""
    from PIL import Image

    for name in ("a", "b"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def stats_files(cache: Path) -> list[Path]:
    return sorted((cache / "stats").glob("*.json")) if (cache / "stats").is_dir() else []


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_stats_cache_follows_images_rewritten_in_place(tmp_path, monkeypatch, in_memory):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    root = write_flat_images(tmp_path / "images", 70)
    first = imagefolder(root, stats_cache=True, in_memory=in_memory)
    assert first.mean[0] == pytest.approx(70 / 255, abs=1e-3)
    assert len(stats_files(tmp_path / "cache")) == 1
    assert imagefolder(root, stats_cache=True, in_memory=in_memory).mean == first.mean  # the cache is used
    write_flat_images(root, 190)  # same names, same count, new pixels
    assert imagefolder(root, stats_cache=True, in_memory=in_memory).mean[0] == pytest.approx(
        190 / 255, abs=1e-3
    )


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"mean": [0.1], "std": [1, 1, 1]}', b'{"mean": [NaN, 0, 0], "std": [1, 1, 1]}'],
    ids=["empty", "not-json", "wrong-length", "nan"],
)
def test_invalid_stats_file_is_recomputed(tmp_path, monkeypatch, caplog, content):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    root = write_flat_images(tmp_path / "images", 70)
    imagefolder(root, stats_cache=True)
    [cached] = stats_files(tmp_path / "cache")
    cached.write_bytes(content)
    assert imagefolder(root, stats_cache=True).mean[0] == pytest.approx(70 / 255, abs=1e-3)
    assert "not valid" in caplog.text
    assert json.loads(cached.read_text())["mean"][0] == pytest.approx(70 / 255, abs=1e-3)  # rewritten whole


@pytest.mark.parametrize(
    "error", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["full", "read-only", "no-permission"]
)
def test_unwritable_stats_cache_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog, error):
    """A cache that fails mid-write leaves no half-written stats file, and the run goes on."""
    from transferlab.data import imagefolder as module

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    real_write = module.write_atomically

    def failing_write(path, write):
        def half_then_fail(f):
            f.write(b'{"mean": [')
            raise OSError(error, os.strerror(error))

        real_write(path, half_then_fail)

    monkeypatch.setattr(module, "write_atomically", failing_write)
    root = write_flat_images(tmp_path / "images", 70)
    assert imagefolder(root, stats_cache=True).mean[0] == pytest.approx(70 / 255, abs=1e-3)
    assert "continuing without the cache" in caplog.text
    assert list((tmp_path / "cache" / "stats").iterdir()) == []
    monkeypatch.setattr(module, "write_atomically", real_write)  # space freed: caching works again
    assert imagefolder(root, stats_cache=True).mean[0] == pytest.approx(70 / 255, abs=1e-3)
    assert len(stats_files(tmp_path / "cache")) == 1
