"""Which images a run sees: the `Split` that holds them, class subsets, the validation split, few-shot subsampling.

All choices are made with explicitly seeded `torch.Generator`s on the CPU, so the same
seed picks the same images in every process and on every machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """A split held in memory. `positions` are indices into the official training/test order."""

    images: torch.Tensor  # uint8 (N, 3, H, W), or images decoded on demand (imagefolder.LazyImages)
    labels: torch.Tensor  # int64 (N,)
    positions: torch.Tensor  # int64 (N,)

    def take(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx], self.positions[idx])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def select_classes(names: Sequence[str], wanted: Sequence[str | int] | None) -> tuple[list[int], list[str]]:
    """Resolve `data.classes` (names or indices) to (original class indices, names) in order."""
    check_two_classes(names, "the dataset")
    if wanted is None:
        return list(range(len(names))), list(names)
    keep: list[int] = []
    for item in wanted:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            index = int(item)
            if not 0 <= index < len(names):
                raise UserError(f"data.classes: class index {index} is out of range 0..{len(names) - 1}")
        elif item in names:
            index = list(names).index(item)
        else:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise UserError(f"data.classes: unknown class {item!r}; valid names: {shown}")
        if index in keep:
            raise UserError(f"data.classes: class {names[index]!r} is listed twice")
        keep.append(index)
    if not keep:
        raise UserError("data.classes is empty; list at least two classes or leave it null")
    if len(keep) < 2:
        raise UserError(
            f"data.classes keeps only the class {names[keep[0]]!r}; a classifier needs at least two: "
            f"list two or more classes (e.g. data.classes=[{names[keep[0]]},...]) or leave data.classes null"
        )
    return keep, [names[i] for i in keep]


def check_two_classes(names: Sequence[str], where: object) -> None:
    """A dataset with fewer than two classes cannot train a classifier (accuracy would be 100%)."""
    if len(names) < 2:
        found = f"only the class {names[0]!r}" if names else "no classes"
        raise UserError(f"{where} has {found}; a classifier needs at least two classes: add another class")


def class_list(classes: object) -> list[str | int] | None:
    """`data.classes` as a list: a string is one name or a comma-separated list, never its letters.

    Hydra reads `data.classes=cat` as the string "cat" and `data.classes=3` as an int;
    `list("cat")` would silently mean the classes c, a and t.
    """
    if classes is None:
        return None
    if isinstance(classes, str):
        return [part.strip() for part in classes.split(",") if part.strip()]
    if isinstance(classes, int) and not isinstance(classes, bool):
        return [classes]
    try:
        return list(classes)
    except TypeError:
        raise UserError(
            f"data.classes={classes!r} is not a list of class names or indices; use e.g. data.classes=[cat,dog]"
        ) from None


def split_train_val(
    train: "Split", val_size: int, seed: int, class_names: Sequence[str] | None = None
) -> tuple["Split", "Split"]:
    """Carve a fixed, stratified validation set out of the training split.

    Each class gives images in proportion to its size (see `stratified_counts`), drawn with
    a generator seeded by `seed` only, never by few-shot settings, so few-shot runs are
    validated on the same images as full runs, and a balanced training set stays balanced.
    """
    return stratified_holdout(train, val_size, seed, "data.val_size", class_names)


def stratified_holdout(
    split: "Split", size: int, seed: int, option: str, class_names: Sequence[str] | None = None
) -> tuple["Split", "Split"]:
    """(rest, held out): `size` images spread over the classes in proportion, seeded.

    `option` names the setting that asked for `size`, for the error messages.
    """
    if size <= 0:
        return split, split.take(torch.empty(0, dtype=torch.long))
    classes = split.labels.unique().tolist()
    members = [torch.nonzero(split.labels == c).flatten() for c in classes]
    names = [class_names[c] if class_names is not None else f"label {c}" for c in classes]
    counts = stratified_counts([len(m) for m in members], size, option, names)
    generator = torch.Generator().manual_seed(int(seed))
    # One draw per class, in class order: a class's choice does not depend on the others' images.
    held = [m[torch.randperm(len(m), generator=generator)[:k]] for m, k in zip(members, counts)]
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(split), dtype=torch.bool)
    mask[held_idx] = False
    return split.take(torch.nonzero(mask).flatten()), split.take(held_idx)


def stratified_counts(class_sizes: Sequence[int], size: int, option: str, names: Sequence[str]) -> list[int]:
    """How many images each class gives to a held-out split of `size` images.

    Proportional to the class sizes (largest remainders, ties to the earlier class), so the
    total is exactly `size` and equal classes give equal counts. Every class keeps at least
    one image for training, and when `size` allows it (size >= number of classes) every
    class also gives at least one, so a small class is still validated.
    """
    total, num_classes = sum(class_sizes), len(class_sizes)
    if size >= total:
        raise UserError(
            f"{option}={size} leaves no training images: the split has {total}; use a smaller {option}"
        )
    low = 1 if size >= num_classes else 0
    for name, n in zip(names, class_sizes):
        if n - 1 < low:
            raise UserError(
                f"{option}={size} holds out at least one image of every class, but class {name!r} has only {n} "
                f"(one must stay for training); add images to {name!r} or remove that class"
            )
    if size > total - num_classes:
        raise UserError(
            f"{option}={size} leaves no training images for some classes: the split has {total} images in "
            f"{num_classes} classes; use {option} <= {total - num_classes}"
        )
    high = [n - 1 for n in class_sizes]
    counts = [min(max(size * n // total, low), hi) for n, hi in zip(class_sizes, high)]

    def shortfall(c: int) -> int:  # > 0: class c gives fewer than its exact share size * n / total
        return size * class_sizes[c] - counts[c] * total

    while sum(counts) < size:
        c = max((c for c in range(num_classes) if counts[c] < high[c]), key=lambda c: (shortfall(c), -c))
        counts[c] += 1
    while sum(counts) > size:
        c = min((c for c in range(num_classes) if counts[c] > low), key=lambda c: (shortfall(c), c))
        counts[c] -= 1
    return counts


def fewshot_indices(
    labels: torch.Tensor,
    class_names: Sequence[str],
    per_class: int | None,
    fraction: float | None,
    seed: int,
) -> torch.Tensor:
    """Indices (into `labels`) of a stratified subsample: K per class or a fraction per class."""
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    rounded_up: list[str] = []  # classes whose fraction rounds to no image
    for c, name in enumerate(class_names):
        members = torch.nonzero(labels == c).flatten()
        count = len(members)
        if per_class is not None:
            k = int(per_class)
            if k > count:
                raise UserError(
                    f"data.fewshot.per_class={k} but class {name!r} has only {count} training "
                    f"images; use per_class <= {count}"
                )
        else:
            k = round(float(fraction) * count)
            if k < 1:
                rounded_up.append(name)
                k = 1
        # A generator draw per class, in class order: stable whatever the other classes hold.
        order = torch.randperm(count, generator=generator)
        chosen.append(members[order[:k]])
    if rounded_up:
        # Every class keeps at least one image: the run trains on more than the fraction asked for.
        log.warning(
            "data.fewshot.fraction=%s rounds to fewer than 1 image per class (%d of %d classes, e.g. %r); "
            "using 1 image in each",
            fraction,
            len(rounded_up),
            len(class_names),
            rounded_up[0],
        )
    return torch.cat(chosen).sort().values


def stratified_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Sorted indices of `count` images drawn per class in proportion to the classes' sizes (largest
    remainders get the images left over, ties to the lower class), the same for the same seed.

    A fixed subset of the test split for a costly evaluation (`eval.images`, `run.robustness`): its
    class balance is the split's, so its accuracy estimates the whole split's.
    """
    total = len(labels)
    if not 0 < count <= total:
        raise ValueError(f"stratified_subset: count must be in [1, {total}], got {count}")
    if count == total:
        return torch.arange(total)
    sizes = torch.bincount(labels)
    exact = sizes.double() * count / total
    quota = exact.floor().long()
    left = count - int(quota.sum())
    order = sorted(range(len(sizes)), key=lambda c: (-(float(exact[c]) - int(quota[c])), c))
    for c in order[:left]:
        quota[c] += 1
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(len(sizes)):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[: int(quota[c])]])
    return torch.cat(chosen).sort().values
