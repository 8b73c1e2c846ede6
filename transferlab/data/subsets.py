"""Which images a run sees: class subsets, the validation split, few-shot subsampling.

All choices are made with explicitly seeded `torch.Generator`s on the CPU, so the same
seed picks the same images in every process and on every machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from transferlab.errors import UserError

if TYPE_CHECKING:
    from transferlab.data.datamodule import Split


def select_classes(
    names: Sequence[str], wanted: Sequence[str | int] | None
) -> tuple[list[int], list[str]]:
    """Resolve `data.classes` (names or indices) to (original class indices, names) in order."""
    if wanted is None:
        return list(range(len(names))), list(names)
    keep: list[int] = []
    for item in wanted:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            index = int(item)
            if not 0 <= index < len(names):
                raise UserError(
                    f"data.classes: class index {index} is out of range 0..{len(names) - 1}"
                )
        elif item in names:
            index = list(names).index(item)
        else:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise UserError(f"data.classes: unknown class {item!r}; valid names: {shown}")
        if index in keep:
            raise UserError(f"data.classes: class {names[index]!r} is listed twice")
        keep.append(index)
    if not keep:
        raise UserError("data.classes is empty; list at least one class or leave it null")
    return keep, [names[i] for i in keep]


def split_train_val(train: "Split", val_size: int, seed: int) -> tuple["Split", "Split"]:
    """Carve a fixed random validation set out of the training split.

    The permutation depends only on `seed` and the training set, never on few-shot
    settings, so few-shot runs are validated on the same images as full runs.
    """
    n = len(train)
    if val_size >= n:
        raise UserError(
            f"data.val_size={val_size} leaves no training images: the training split has {n}; "
            f"use a smaller data.val_size"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return train.take(train_idx), train.take(val_idx)


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
            k = max(1, round(float(fraction) * count))
        # A generator draw per class, in class order: stable whatever the other classes hold.
        order = torch.randperm(count, generator=generator)
        chosen.append(members[order[:k]])
    return torch.cat(chosen).sort().values
