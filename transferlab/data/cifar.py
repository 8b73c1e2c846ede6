"""CIFAR-10 and CIFAR-100 from the official "python version" files.

Looked for under `root`, in this order: the extracted folder (`cifar-10-batches-py/`,
`cifar-100-python/`), the official archive next to it (extracted once), and finally
torchvision's own download when `download=true`. Offline with nothing on disk, the
download fails fast with one line saying where the files were looked for.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from transferlab.data.datamodule import TensorImageDataModule
from transferlab.utils.errors import UserError
from transferlab.utils.network import fail_fast_when_offline

log = logging.getLogger(__name__)


class CIFARDataModule(TensorImageDataModule):
    """Shared reader for the two CIFAR datasets; subclasses name files and label keys."""

    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    torchvision_class: str

    def prepare_data(self) -> None:
        self._locate()

    # ---- finding the files --------------------------------------------------------------
    def _locate(self) -> Path:
        folder = self.root / self.folder
        archive = self.root / self.archive
        if folder.is_dir():
            missing = self._missing_files(folder)
            if not missing or not archive.is_file():
                return folder  # a missing file is named when it is read
            # Left by an interrupted extraction (older versions extracted in place).
            log.warning("%s lacks %s; extracting it again from %s", folder, ", ".join(missing), archive)
            self._extract(archive)
            return folder
        if archive.is_file():
            self._extract(archive)
            return folder
        self.check_root(self.root, self.download)
        if not self.download:
            raise UserError(
                f"{self.name} not found: no {self.folder}/ or {self.archive} in {self.root}; "
                f"put the official python-version files there or set data.download=true"
            )
        self._download()
        return folder

    @property
    def expected_files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def _missing_files(self, folder: Path) -> list[str]:
        return [name for name in self.expected_files if not (folder / name).is_file()]

    @classmethod
    def check_root(cls, root: Path, download: bool) -> None:
        """Refuse a `data.root` that holds files but not the dataset.

        Such a folder is almost always a wrong path (the home folder, the project, the dataset's
        own subfolder), and with `data.download=true` the download would litter it with an
        archive and an extracted tree. A missing or empty folder is fine (the download goes
        there, or the error says how to get the files), and so is a folder that already holds
        another dataset we know (a shared `./data` with CIFAR-10 in it gets CIFAR-100 next to it).
        Also called by `transferlab.data.datamodule.check_data_root` before anything is built.
        """
        if root.exists() and not root.is_dir():
            raise UserError(
                f"data.root={root} is a file; point data.root at the folder that contains {cls.folder}/"
            )
        entries = _visible_entries(root)
        if not entries or (root / cls.folder).is_dir() or (root / cls.archive).is_file():
            return
        if download and entries & _known_dataset_files():
            return
        if root.name == cls.folder:
            raise UserError(
                f"data.root={root} is the dataset folder itself; set data.root={root.parent} "
                f"(the folder that contains {cls.folder}/)"
            )
        refused_download = (
            " (data.download=true does not download into a folder of unrelated files)" if download else ""
        )
        raise UserError(
            f"data.root={root} exists but holds no {cls.name} ({cls.folder}/ or {cls.archive}){refused_download}; "
            f"point data.root at the folder that contains {cls.folder}/, or at a new or empty folder with data.download=true"
        )

    def _extract(self, archive: Path) -> None:
        """Extract into a temporary sibling folder and rename it into place only when complete.

        A truncated or corrupt archive then leaves nothing behind, and a later run with a good
        archive extracts again instead of failing on a half-written folder.
        """
        log.info("extracting %s", archive)
        folder = self.root / self.folder
        try:
            scratch = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{self.folder}.extracting-"))
        except OSError as e:
            raise UserError(
                f"cannot extract {archive}: {self.root} is not writable ({e.strerror}); extract it yourself, "
                f"or copy the archive to a writable folder and set data.root to it"
            ) from None
        try:
            self._extract_complete_copy(archive, scratch)
            if folder.is_dir():  # an incomplete older extraction: swap it out, then it goes with scratch
                folder.rename(scratch / "incomplete")
            (scratch / self.folder).rename(folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _extract_complete_copy(self, archive: Path, scratch: Path) -> None:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(scratch, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UserError(
                f"cannot extract {archive} ({type(e).__name__}: {_first_line(e)}); the archive is damaged or "
                f"incomplete: delete it and download it again, or replace it with the official archive"
            ) from None
        except OSError as e:  # the archive is fine, the disk is not (full, read-only)
            raise UserError(
                f"cannot extract {archive} into {self.root} ({e.strerror or type(e).__name__}); "
                f"free some space there or set data.root to another folder"
            ) from None
        extracted = scratch / self.folder
        missing = self._missing_files(extracted) if extracted.is_dir() else [f"{self.folder}/"]
        if missing:
            raise UserError(
                f"{archive} is not the official {self.name} archive (it lacks {', '.join(missing)}); "
                f"replace it with {self.archive} from the CIFAR website"
            )

    def _download(self) -> None:
        dataset_class = getattr(tvd, self.torchvision_class)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with fail_fast_when_offline():  # an offline machine must not hang
                dataset_class(str(self.root), train=True, download=True)
        except Exception as e:  # urllib, socket and http errors all mean "could not fetch"
            raise UserError(
                f"{self.name} not found in {self.root} (looked for {self.folder}/ and {self.archive}) "
                f"and the download failed ({type(e).__name__}: {_first_line(e)}); on a machine without "
                f"internet copy the official python-version files there or set data.root to where they are"
            ) from None

    # ---- reading --------------------------------------------------------------------------
    def read_split(self, train: bool):
        folder = self._locate()
        files = self.train_files if train else self.test_files
        names = self._read_names(folder)
        images, labels = [], []
        for name in files:
            data, label = self._read_batch(folder / name, len(names))
            images.append(torch.from_numpy(data))
            labels.append(torch.from_numpy(label))
        labels = torch.cat(labels)
        if train:
            self._check_every_class_has_images(folder, labels, names)
        self._warn_once_if_not_official(folder)
        return torch.cat(images), labels, names

    def _read_names(self, folder: Path) -> list[str]:
        path = folder / self.meta_file
        meta = self._load_pickle(path)
        if self.names_key not in meta:
            raise UserError(
                f"{path} has no {self.names_key!r}; replace it with the official {self.meta_file} file"
            )
        return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[self.names_key]]

    def _read_batch(self, path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (N, 3, 32, 32), int64 labels (N,)) of one batch file, checked."""
        entry = self._load_pickle(path)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            label = np.asarray(entry[self.label_key], dtype=np.int64).reshape(-1)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(
                f"{path} is not a {self.name} batch file ({type(e).__name__}: {e}); replace it with the official file"
            ) from None
        if len(data) != len(label):
            raise UserError(
                f"{path} holds {len(data)} images but {len(label)} labels; replace it with the official file"
            )
        bad = (label < 0) | (label >= num_classes)
        if bad.any():
            raise UserError(
                f"{path} has label {int(label[bad][0])} ({int(bad.sum())} of {len(label)} labels are outside "
                f"0..{num_classes - 1}, the {num_classes} classes named in {self.meta_file}); replace it with the official file"
            )
        return data, label

    def _check_every_class_has_images(self, folder: Path, labels: torch.Tensor, names: list[str]) -> None:
        """A name in the meta file that no training image carries would be a phantom class:
        an output the head can never learn, counted in every accuracy."""
        counts = torch.bincount(labels, minlength=len(names))
        empty = [name for name, count in zip(names, counts.tolist()) if count == 0]
        if empty:
            raise UserError(
                f"{folder / self.meta_file} names {len(names)} classes but the training files have no image of "
                f"{', '.join(repr(n) for n in empty[:5])}{', ...' if len(empty) > 5 else ''}; "
                f"the meta file does not belong to these batches: replace it with the official one"
            )

    def _load_pickle(self, path: Path) -> dict[str, object]:
        """A CIFAR pickle as a dict with str keys (Python 2 wrote bytes keys, Python 3 copies str)."""
        if not path.is_file():
            raise UserError(
                f"{path} is missing; the folder {path.parent} is not a complete copy of the "
                f"official {self.name} python-version files"
            )
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="bytes")
        except Exception as e:
            raise UserError(
                f"cannot read {path} ({type(e).__name__}: {_first_line(e)}); {self._replace_hint(path)}"
            ) from None
        if not isinstance(entry, dict):
            raise UserError(
                f"{path} holds a {type(entry).__name__}, not a CIFAR dict; {self._replace_hint(path)}"
            )
        return {
            key.decode("latin1") if isinstance(key, bytes) else str(key): value
            for key, value in entry.items()
        }

    def _replace_hint(self, path: Path) -> str:
        archive = self.root / self.archive
        if archive.is_file() and path.parent == self.root / self.folder:
            return f"delete {path.parent} to extract it again from {archive}, or replace the file with the official one"
        return "replace it with the official file"

    @property
    def md5(self) -> dict[str, str]:
        """File name -> official MD5, from torchvision's own table (not a copy of ours)."""
        dataset = getattr(tvd, self.torchvision_class)
        pairs = dataset.train_list + dataset.test_list + [[dataset.meta["filename"], dataset.meta["md5"]]]
        return {name: md5 for name, md5 in pairs}

    def _warn_once_if_not_official(self, folder: Path) -> None:
        """Both splits and the meta file at the first read: one warning per run, not one per split."""
        if getattr(self, "_md5_checked", None) == folder:
            return
        self._md5_checked = folder
        present = [n for n in (*self.train_files, *self.test_files, self.meta_file) if (folder / n).is_file()]
        self._warn_if_not_official(folder, present)

    def _warn_if_not_official(self, folder: Path, names: list[str]) -> None:
        """A re-encoded copy reads fine: say so once, don't refuse it."""
        official = self.md5
        differ = [n for n in names if n in official and _md5(folder / n) != official[n]]
        if differ:
            warnings.warn(
                f"{len(differ)} file(s) in {folder} ({', '.join(differ)}) do not match the official "
                f"{self.name} MD5 sums (a re-encoded copy?); reading them anyway",
                stacklevel=2,
            )


class CIFAR10DataModule(CIFARDataModule):
    name = "cifar10"
    folder = "cifar-10-batches-py"
    archive = "cifar-10-python.tar.gz"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    torchvision_class = "CIFAR10"
    dataset_mean = (0.4914, 0.4822, 0.4465)
    dataset_std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModule):
    name = "cifar100"
    folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"  # the 100 fine classes, not the 20 superclasses
    names_key = "fine_label_names"
    torchvision_class = "CIFAR100"
    dataset_mean = (0.5071, 0.4865, 0.4409)
    dataset_std = (0.2673, 0.2564, 0.2762)


def _visible_entries(root: Path) -> set[str]:
    """Names in `root`, hidden ones (.DS_Store, .ipynb_checkpoints) left out; empty if it is missing."""
    if not root.is_dir():
        return set()
    return {entry.name for entry in root.iterdir() if not entry.name.startswith(".")}


def _known_dataset_files() -> set[str]:
    return {name for module in CIFARDataModule.__subclasses__() for name in (module.folder, module.archive)}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
