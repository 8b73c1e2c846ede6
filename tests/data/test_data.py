"""DataModules: splits, few-shot subsets, class subsets, image folders, batched ops, errors."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cifar10_datamodule

from transferlab import CIFAR10DataModule, CIFAR100DataModule
from transferlab.data import ImageFolderDataModule
from transferlab.data import transforms as T
from transferlab.utils.errors import UserError

cifar10 = cifar10_datamodule  # the shared helper, under the short name these tests use


def _counts(labels: torch.Tensor, n: int) -> list[int]:
    return torch.bincount(labels, minlength=n).tolist()


# ---- CIFAR files ---------------------------------------------------------------------------
def test_cifar10_reads_official_layout(cifar10_root):
    dm = cifar10(cifar10_root)
    assert dm.train.images.dtype == torch.uint8 and dm.train.images.shape[1:] == (3, 32, 32)
    assert len(dm.train) + len(dm.val) == 300 and len(dm.val) == 50 and len(dm.test) == 100
    assert dm.class_names[0] == "airplane" and dm.num_classes == 10


def test_cifar100_uses_fine_labels(cifar100_root):
    dm = CIFAR100DataModule(root=str(cifar100_root), download=False, val_size=100)
    dm.setup()
    assert dm.num_classes == 100
    assert int(dm.train.labels.max()) == 99  # coarse labels would stop at 19


def test_reads_official_archive_when_folder_is_absent(cifar10_root, tmp_path):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(cifar10_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    dm = cifar10(tmp_path)
    assert len(dm.test) == 100


def test_non_official_files_warn_but_load(cifar10_root):
    with pytest.warns(UserWarning, match="do not match the official cifar10 MD5"):
        cifar10(cifar10_root)


def test_malformed_file_names_the_file(cifar10_root, tmp_path):
    shutil.copytree(cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        cifar10(tmp_path)


def test_offline_without_data_fails_fast_with_one_line(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
        CIFAR10DataModule(root=str(tmp_path / "nothing"), download=True).prepare_data()
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert "\n" not in message and "nothing" in message and "download failed" in message


def test_existing_folder_without_dataset_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="holds no cifar10"):
        CIFAR10DataModule(root=str(tmp_path / "photos"), download=False).prepare_data()


# ---- validation split and few-shot ---------------------------------------------------------
def test_train_and_val_are_disjoint_and_fixed(cifar10_root):
    a, b = cifar10(cifar10_root), cifar10(cifar10_root, seed=99)
    assert not set(a.train.positions.tolist()) & set(a.val.positions.tolist())
    assert torch.equal(a.val.positions, b.val.positions)  # the run seed does not move val


@pytest.mark.parametrize("k", [1, 5, 20])
def test_fewshot_per_class_is_exact(cifar10_root, k):
    dm = cifar10(cifar10_root, fewshot={"per_class": k})
    assert _counts(dm.train.labels, 10) == [k] * 10


def test_fewshot_fraction_is_stratified(cifar10_root):
    full = cifar10(cifar10_root)
    dm = cifar10(cifar10_root, fewshot={"fraction": 0.1})
    expected = [max(1, round(0.1 * c)) for c in _counts(full.train.labels, 10)]
    assert _counts(dm.train.labels, 10) == expected


def test_fewshot_seed_reproducible_and_sensitive(cifar10_root):
    a = cifar10(cifar10_root, fewshot={"per_class": 5, "seed": 1})
    b = cifar10(cifar10_root, fewshot={"per_class": 5, "seed": 1})
    c = cifar10(cifar10_root, fewshot={"per_class": 5, "seed": 2})
    assert torch.equal(a.train.positions, b.train.positions)
    assert not torch.equal(a.train.positions, c.train.positions)
    d = cifar10(cifar10_root, fewshot={"per_class": 5}, seed=1)  # default: the run's seed
    assert torch.equal(a.train.positions, d.train.positions)


def test_fewshot_keeps_validation_and_writes_indices(cifar10_root, tmp_path):
    full = cifar10(cifar10_root)
    dm = cifar10(cifar10_root, fewshot={"per_class": 3}, output_dir=str(tmp_path))
    assert torch.equal(full.val.positions, dm.val.positions)
    record = json.loads((tmp_path / "fewshot_indices.json").read_text())
    assert record["per_class"] == {name: 3 for name in dm.class_names}
    assert record["indices"] == dm.train.positions.tolist()
    assert set(record["indices"]) <= set(full.train.positions.tolist())


@pytest.mark.parametrize(
    "fewshot, match",
    [
        ({"per_class": 1000}, "has only"),
        ({"per_class": 0}, "positive"),
        ({"fraction": 0.0}, r"\(0, 1\]"),
        ({"fraction": 1.5}, r"\(0, 1\]"),
        ({"per_class": 2, "fraction": 0.5}, "only one"),
    ],
)
def test_fewshot_errors(cifar10_root, fewshot, match):
    with pytest.raises(UserError, match=match):
        cifar10(cifar10_root, fewshot=fewshot)


def test_val_size_too_large(cifar10_root):
    with pytest.raises(UserError, match="val_size=300"):
        cifar10(cifar10_root, val_size=300)


# ---- class subsets ------------------------------------------------------------------------
def test_class_subset_relabels_in_given_order(cifar10_root):
    full = cifar10(cifar10_root)
    dm = cifar10(cifar10_root, classes=["truck", "cat", 0])
    assert dm.class_names == ["truck", "cat", "airplane"] and dm.num_classes == 3
    for split, full_split in ((dm.test, full.test),):
        original = full_split.labels[split.positions]
        assert torch.equal(torch.tensor([9, 3, 0])[split.labels], original)
    assert set(dm.train.labels.tolist()) == {0, 1, 2}


def test_unknown_class_name(cifar10_root):
    with pytest.raises(UserError, match="unknown class 'unicorn'.*valid names: airplane"):
        cifar10(cifar10_root, classes=["cat", "unicorn"])


# ---- loaders: independent of num_workers ------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_do_not_depend_on_num_workers(cifar10_root, workers):
    reference = cifar10(cifar10_root, batch_size=16, augment=True)
    other = cifar10(cifar10_root, batch_size=16, augment=True, num_workers=workers)

    def epoch(dm):
        torch.manual_seed(7)
        return [(dm.preprocess(x, train=True), y) for x, y in dm.train_dataloader()]

    for (xa, ya), (xb, yb) in zip(epoch(reference), epoch(other), strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


# ---- batched ops --------------------------------------------------------------------------
def test_flip_is_a_flip():
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    torch.manual_seed(0)
    out = T.batch_flip_lr(images)
    for i in range(2):
        assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))
    torch.manual_seed(0)
    many = T.batch_flip_lr(images.repeat(50, 1, 1, 1))
    flipped = sum(torch.equal(m, images[i % 2].flip(-1)) for i, m in enumerate(many))
    assert 20 < flipped < 80  # about half


def test_crop_takes_a_window_of_the_padded_image():
    images = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = T.batch_crop(images, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(images)):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert windows, f"image {i} is not a window of its padded image"
        offsets.add(windows[0])
    assert len(offsets) > 5  # the offsets vary


def test_normalize_and_resize():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = T.normalize(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(out, torch.full_like(out, 2.0))
    assert T.resize(out, 8).shape == (2, 3, 8, 8)


# ---- image folders ------------------------------------------------------------------------
def _write_images(folder: Path, classes: dict[str, int], size: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")


def imagefolder(root, **kwargs) -> ImageFolderDataModule:
    kwargs.setdefault("image_size", 8)
    dm = ImageFolderDataModule(root=str(root), **kwargs)
    dm.setup("fit")
    return dm


def test_imagefolder_single_tree_is_split_stratified(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    _write_images(tmp_path / "pics", {"cats": 20, "dogs": 10})
    dm = imagefolder(tmp_path / "pics", val_size=6, test_size=6, normalization="dataset")
    assert dm.class_names == ["cats", "dogs"]
    assert len(dm.train) + len(dm.val) + len(dm.test) == 30
    assert _counts(dm.test.labels, 2) == [4, 2]  # in proportion to 20:10
    assert dm.train.images.shape[1:] == (3, 8, 8)
    assert list((tmp_path / "cache" / "stats").glob("*.json"))  # dataset stats cached
    streamed = imagefolder(tmp_path / "pics", val_size=6, test_size=6, in_memory=False)
    images, labels = next(iter(streamed.test_dataloader()))
    assert torch.equal(images, dm.test.images[: len(images)])


def test_imagefolder_explicit_splits_and_errors(tmp_path):
    for split, count in (("train", 8), ("val", 2), ("test", 3)):
        _write_images(tmp_path / "data" / split, {"a": count, "b": count})
    dm = imagefolder(tmp_path / "data", fewshot={"per_class": 4})
    assert (len(dm.train), len(dm.val), len(dm.test)) == (8, 4, 6)

    _write_images(tmp_path / "bad" / "train", {"a": 3, "b": 3})
    _write_images(tmp_path / "bad" / "test", {"a": 3, "c": 3})
    with pytest.raises(UserError, match="same class folders"):
        imagefolder(tmp_path / "bad")

    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match=r"empty/a holds no images"):
        imagefolder(tmp_path / "empty")

    _write_images(tmp_path / "broken", {"a": 3, "b": 3})
    (tmp_path / "broken" / "a" / "zzz.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="zzz.png"):
        imagefolder(tmp_path / "broken", val_size=0)


def test_an_animated_gif_in_an_image_folder_is_read_as_its_first_frame(tmp_path):
    """Training and prediction read images with one function; a GIF's frames must not become a batch."""
    import numpy as np
    from PIL import Image

    from transferlab.data.imagefolder import decode_image

    frames = [Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)) for value in (30, 220)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = decode_image(tmp_path / "moving.gif", 16)
    assert tuple(image.shape) == (3, 16, 16)
    assert abs(int(image.float().mean()) - 30) <= 3  # the dark first frame, not the bright second
