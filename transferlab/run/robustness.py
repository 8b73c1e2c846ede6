"""Corruption robustness after the test (`conf/eval/`): the tested weights on corrupted test images.

After the clean test, whatever the run did before (a fit, a solve, or only the test of a finished
run), the model holds the weights it tested. With `eval.corruptions` set, this module corrupts the
stored 32 px uint8 test images (`data.corruptions`: CIFAR-10-C-style, Hendrycks & Dietterich 2019,
its published parameters), each listed corruption at each listed severity, deterministic for
`eval.seed`, and tests those weights on them, through the run's own eval transform:

- `test_c/acc`: the mean accuracy over the (corruption, severity) pairs;
- `test_c/acc/<corruption>/<severity>` and `test_c/acc/severity<k>` (mean over the corruptions);
- `test_c/clean_acc`: the clean accuracy of the very same images (with `eval.images`, a subset);
- `test_c/images`: how many test images each pair holds.

`eval.images=N` evaluates on a fixed stratified subset of the test split (`data.subsets`); the
clean test stays whole. Corrupted images are cached like features (keyed by the images' content,
the corruption, severity, seed and the implementation's version), and so are the backbone features
of corrupted images for runs that train on cached features (frozen, linear_probe, knn, ncm).
Nothing trained changes, so `eval` may change on a resume (`run.resume`): a finished run resumed
with `ckpt_path=last eval=corruptions` tests its best checkpoint again and evaluates only this.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from transferlab.data.subsets import Split, stratified_subset
from transferlab.utils.errors import UserError

log = logging.getLogger("transferlab")

#: the keys of the `eval` group (conf/eval/none.yaml)
EVAL_KEYS = ("corruptions", "severities", "images", "seed")
#: metrics.json's prefix of everything this module writes
PREFIX = "test_c/"
#: the stored images the published parameters are for
IMAGE_SIZE = 32
_SEED_MAX = 2**32 - 1


# ---- the settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorruptionEval:
    """What `eval` asks for: each corruption at each severity, on `images` test images (None: all)."""

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    images: int | None
    seed: int

    @property
    def pairs(self) -> list[tuple[str, int]]:
        return [(name, severity) for name in self.corruptions for severity in self.severities]

    def record(self) -> dict[str, Any]:
        """run_info.json's `eval`: the settings as resolved, and which implementation ran."""
        from transferlab.data import corruptions

        return {
            "corruptions": list(self.corruptions),
            "severities": list(self.severities),
            "images": self.images,
            "seed": self.seed,
            "implementation": f"transferlab CIFAR-10-C-style, version {corruptions.VERSION}",
            "not_implemented": dict(corruptions.OMITTED),
        }


def eval_settings(node: Any) -> CorruptionEval | None:
    """The `eval` node, checked (one line for anything wrong); None when it asks for no corruption.
    A config without the node (composed by hand, or recorded before it existed) asks for none."""
    if node is None:
        return None
    if not isinstance(node, (DictConfig, dict)):
        raise UserError(
            f"eval={node!r} must be a group of settings: eval=corruptions, or eval.corruptions=[...]"
        )
    unknown = [str(key) for key in node if key not in EVAL_KEYS]
    if unknown:
        raise UserError(
            f"eval.{unknown[0]} is not an eval setting; the group has eval.{', eval.'.join(EVAL_KEYS)}"
        )
    names = _names(node.get("corruptions"))
    if not names:
        return None
    return CorruptionEval(
        corruptions=names,
        severities=_severities(node.get("severities", [1, 2, 3, 4, 5])),
        images=_images(node.get("images")),
        seed=_seed(node.get("seed", 0)),
    )


def check_eval(node: Any, test: bool) -> None:
    """The `eval` node, before anything is built: known values, and a test to evaluate after."""
    settings = eval_settings(node)
    if settings is not None and not test:
        raise UserError(
            "eval.corruptions tests the tested checkpoint on corrupted images after the clean test, but "
            "test=false; set test=true (a finished run is evaluated later with ckpt_path=last test=true "
            "eval=corruptions)"
        )


def check_eval_fits(node: Any, datamodule) -> None:
    """After the data is read, before any training: the test images can be corrupted, and there are
    as many as `eval.images` asks for."""
    settings = eval_settings(node)
    if settings is None:
        return
    test = datamodule.test_images
    images = test.images
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise UserError(
            f"eval.corruptions corrupts the stored uint8 test images, but {datamodule.name} decodes its "
            f"images from files on demand; evaluate corruptions on data=cifar10 or data=cifar100"
        )
    if tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(
            f"eval.corruptions: the CIFAR-10-C parameters are for {IMAGE_SIZE} px images, but the test images "
            f"of {datamodule.name} are stored at {images.shape[-1]} px"
        )
    if settings.images is not None and settings.images > len(test):
        raise UserError(
            f"eval.images={settings.images} but the test split has {len(test)} images; set eval.images<={len(test)}, "
            f"or eval.images=null (all of them)"
        )
    if settings.images is not None and settings.images < datamodule.num_classes:
        raise UserError(
            f"eval.images={settings.images} is fewer than the {datamodule.num_classes} classes: a stratified subset "
            f"needs at least one image of each; set eval.images>={datamodule.num_classes}"
        )


def _names(value: Any) -> tuple[str, ...]:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return ()
    if isinstance(value, (list, ListConfig)) and not value:
        return ()
    from transferlab.data.corruptions import CORRUPTIONS, OMITTED  # the ops: only when corruptions are asked

    if isinstance(value, str) and value.lower() == "all":
        return tuple(CORRUPTIONS)
    listed = (
        [value] if isinstance(value, str) else list(value) if isinstance(value, (list, ListConfig)) else None
    )
    if listed is None or not all(isinstance(name, str) for name in listed):
        raise UserError(
            f"eval.corruptions={value!r} must be a list of corruption names ('eval.corruptions=[fog,contrast]') or all"
        )
    if "all" in listed:
        raise UserError("eval.corruptions: all stands for the whole list; write eval.corruptions=all alone")
    for name in listed:
        if name in OMITTED:
            raise UserError(
                f"eval.corruptions: {name} is not implemented here ({OMITTED[name]}); leave it out"
            )
        if name not in CORRUPTIONS:
            near = difflib.get_close_matches(name, CORRUPTIONS, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise UserError(
                f"eval.corruptions: {name!r} is not a corruption; {hint}choose from {', '.join(CORRUPTIONS)}, or all"
            )
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    if repeated:
        raise UserError(
            f"eval.corruptions lists {', '.join(repeated)} more than once; list each corruption once"
        )
    return tuple(listed)


def _severities(value: Any) -> tuple[int, ...]:
    listed = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(listed, (list, ListConfig)) or not listed:
        raise UserError(
            f"eval.severities={value!r} must be a non-empty list of severities from 1 to 5 ('[1,3,5]')"
        )
    for severity in listed:
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
            raise UserError(
                f"eval.severities: {severity!r} is not a severity; severities are the integers 1 to 5 (CIFAR-10-C's)"
            )
    if len(set(listed)) != len(listed):
        raise UserError(f"eval.severities={list(listed)} repeats a severity; list each once")
    return tuple(int(s) for s in listed)


def _images(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"eval.images={value!r} must be a positive number of test images, or null (the whole test split)"
        )
    return int(value)


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _SEED_MAX:
        raise UserError(f"eval.seed={value!r} must be an integer from 0 to {_SEED_MAX}")
    return int(value)


# ---- after the test -----------------------------------------------------------------------------
def evaluate_corruptions(node: Any, trainer, model, datamodule, use_disk: bool) -> tuple[dict, dict | None]:
    """(metrics, run_info record) of the corruption evaluation `eval` asks for; ({}, None) when it
    asks for none or the run ran no test."""
    settings = eval_settings(node)
    if settings is None or getattr(model, "test_logits", None) is None:
        return {}, None
    from transferlab.run.calibration import split_logits  # the test's own forward pass

    test = eval_subset(settings, datamodule.test_images)

    def accuracy(images: torch.Tensor) -> float:
        split = Split(images, test.labels, test.positions)
        if model.inputs_are_features:  # a head on cached features: the corrupted images' features
            features = _features(
                model.backbone,
                datamodule,
                split,
                trainer.strategy.root_device,
                use_disk,
                str(trainer.precision),
            )
            split = Split(features, test.labels, test.positions)
        logits, labels = split_logits(trainer, model, datamodule, split)
        return float((logits.argmax(dim=1) == labels).double().mean())

    metrics = corruption_metrics(settings, test, accuracy, use_disk)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    return metrics, settings.record()


def eval_subset(settings: CorruptionEval, test: Split) -> Split:
    """The test images the corruptions are evaluated on: all, or the fixed stratified `eval.images`."""
    if settings.images is None:
        return test
    return test.take(stratified_subset(test.labels, settings.images, settings.seed))


def corruption_metrics(
    settings: CorruptionEval, test: Split, accuracy: Callable[[torch.Tensor], float], use_disk: bool
) -> dict[str, float]:
    """The `test_c/*` metrics of `accuracy` (uint8 images of `test`, in its order -> accuracy) on
    `test` (already the eval subset) clean and under each (corruption, severity) pair."""
    metrics: dict[str, float] = {f"{PREFIX}images": len(test), f"{PREFIX}clean_acc": accuracy(test.images)}
    log.info(
        "corruptions: %d pairs on %d test images (clean accuracy of these: %.2f%%)",
        len(settings.pairs),
        len(test),
        100 * metrics[f"{PREFIX}clean_acc"],
    )
    for name, severity in settings.pairs:
        corrupted = corrupted_images(test.images, name, severity, settings.seed, use_disk)
        metrics[f"{PREFIX}acc/{name}/{severity}"] = accuracy(corrupted)
        log.info(
            "corruptions: %s severity %d: %.2f%%",
            name,
            severity,
            100 * metrics[f"{PREFIX}acc/{name}/{severity}"],
        )
    for severity in settings.severities:
        values = [metrics[f"{PREFIX}acc/{name}/{severity}"] for name in settings.corruptions]
        metrics[f"{PREFIX}acc/severity{severity}"] = sum(values) / len(values)
    pairs = [metrics[f"{PREFIX}acc/{name}/{severity}"] for name, severity in settings.pairs]
    metrics[f"{PREFIX}acc"] = sum(pairs) / len(pairs)
    log.info("corruptions: test_c/acc %.2f%% (mean over the pairs)", 100 * metrics[f"{PREFIX}acc"])
    return metrics


def with_corruption_results(metrics: dict, corruption_metrics: dict) -> dict:
    """`metrics` with this evaluation's test_c/* in place of any earlier one's (a finished run resumed
    with other eval.* settings: said once, naming what goes)."""
    kept = without_corruption_results(metrics)
    replaced = sorted(set(metrics) - set(kept) - set(corruption_metrics))
    if replaced:
        log.warning(
            "eval: this run's earlier corruption results are replaced by this evaluation's (%d of them "
            "are not in it, e.g. %s); run_info.json records the settings of the ones kept",
            len(replaced),
            replaced[0],
        )
    return {**kept, **corruption_metrics}


def without_corruption_results(metrics: dict) -> dict:
    """A finished run's metrics without an earlier corruption evaluation's (a new one replaces it)."""
    return {key: value for key, value in metrics.items() if not key.startswith(PREFIX)}


def _features(backbone, datamodule, split: Split, device, use_disk: bool, precision: str) -> torch.Tensor:
    from transferlab.data.features import images_features

    return images_features(backbone, datamodule, split, device, use_disk, precision)


# ---- the corrupted images, cached ---------------------------------------------------------------
def corrupted_images(
    images: torch.Tensor, name: str, severity: int, seed: int, use_disk: bool
) -> torch.Tensor:
    """`images` corrupted by `name` at `severity`: from the cache when they are there, else computed
    (and stored; a failed write warns and the run goes on with them in memory)."""
    from transferlab.data import corruptions
    from transferlab.data.features import tensor_hash
    from transferlab.store.files import cache_root, remove_orphaned_temp_files, write_atomically

    key = hashlib.sha256(
        f"v{corruptions.VERSION}|{tensor_hash(images)}|{name}|{severity}|{seed}".encode()
    ).hexdigest()[:32]
    folder = cache_root() / "corruptions"
    path = folder / f"{key}.pt"
    if use_disk and path.is_file():
        cached = _load(path, key, images)
        if cached is not None:
            return cached
    corrupted = corruptions.corrupt(images, name, severity, seed)
    if use_disk:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_orphaned_temp_files(folder)
            write_atomically(path, lambda f: torch.save({"key": key, "images": corrupted}, f))
        except OSError as e:
            log.warning(
                "could not write the corrupted-image cache %s (%s); this run goes on with them in memory "
                "(TRANSFERLAB_CACHE moves the cache to a folder with room)",
                path,
                e.strerror or type(e).__name__,
            )
    return corrupted


def _load(path, key: str, images: torch.Tensor) -> torch.Tensor | None:
    """The cached corrupted images, or None when the file is damaged or not what its name says."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(record, dict):  # a bare tensor: indexing it by name would warn, not fail
            record = {}
        cached = record.get("images")
        valid = (
            record.get("key") == key
            and isinstance(cached, torch.Tensor)
            and cached.dtype == torch.uint8
            and cached.shape == images.shape
        )
    except Exception as e:  # a truncated or foreign file
        log.warning(
            "corrupted-image cache %s is unreadable (%s); computing them again", path, type(e).__name__
        )
        return None
    if not valid:
        log.warning("corrupted-image cache %s does not match these images; computing them again", path)
        return None
    return cached
