"""The config as a whole: where it lives, composing it, its dotted settings, and its own checks.

`build.check_config` runs these first, then asks each owner to check its own slice (the
trainer's budget: `run.budget`; the mode: `methods.modes`; the model's components:
`models.module`; the data root: the data module; resuming: `run.resume`). What is checked
here is what no single owner sees in time: values left as `???`, the types of numbers typed on
the command line (a typo like `data.batch_size=12a` would otherwise end in a conversion error
deep inside a constructor, or in Lightning), groups replaced by a value, and the seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from transferlab.utils.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """`conf/` inside the installed package (wheel), else the repository's top-level `conf/`."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(
        f"transferlab's configs are missing: no conf/train.yaml in {PACKAGE_DIR} or its parent"
    )


#: settings that must be numbers: key -> (int or float, whether null is allowed)
NUMERIC_SETTINGS = {
    "seed": (int, False),
    "data.batch_size": (int, False),
    "data.eval_batch_size": (int, True),
    "data.val_size": (int, False),
    "data.image_size": (int, False),
    "data.num_workers": (int, False),
    "data.fewshot.per_class": (int, True),
    "data.fewshot.fraction": (float, True),
    "optimizer.lr": (float, False),
    "optimizer.weight_decay": (float, False),
    "optimizer.momentum": (float, False),
    "head.hidden": (int, False),
    "head.dropout": (float, False),
    "model.backbone_lr_ratio": (float, False),
    "model.layer_decay": (float, True),
    "trainer.max_epochs": (int, False),
    "trainer.max_steps": (int, False),
    "trainer.limit_train_batches": (float, True),
    "trainer.limit_val_batches": (float, True),
    "trainer.limit_test_batches": (float, True),
}
#: where a numeric setting means what it says (finite numbers outside give overflow, or no training)
NUMERIC_RANGES = {
    "optimizer.lr": (
        1e-10,
        10,
        "a step that large diverges at once, one that small never moves (the presets use 1e-4 to 1e-1)",
    ),
    "optimizer.weight_decay": (0, 1, "a decay above 1 per unit rate shrinks every weight to 0"),
    # only an upper bound: the data module says "a positive integer" below 1
    "data.batch_size": (None, 2**20, "more images than any split here holds, almost surely a typo"),
    "data.eval_batch_size": (
        1,
        2**20,
        "a batch holds at least one image, and 2^20 is more than any split here (null: data.batch_size)",
    ),
}
#: settings that must be groups of settings (or null), as `++data.fewshot=5` would replace one by a number
MAPPING_SETTINGS = {"data.fewshot": "data.fewshot.per_class=5 or data.fewshot.fraction=0.1"}
#: seeds that numpy (and so Lightning's seed_everything) accepts
SEED_RANGE = (0, 2**32 - 1)


def check_config_itself(cfg: DictConfig) -> None:
    """What the config as a whole must be, whatever its parts mean: no `???` left, numbers where
    numbers go, groups where groups go, a seed numpy accepts."""
    check_required(cfg)
    check_numbers(cfg)
    check_mappings(cfg)
    check_seed(cfg.seed)


def check_required(cfg: DictConfig) -> None:
    """Settings a config leaves as `???` (an experiment's `source`, `backbone=torchvision`'s name)."""
    # Read without resolving: `${hydra:...}` settings resolve only inside a Hydra job, and this check
    # also runs before Hydra (cli.overrides); an interpolation of a `???` setting is that setting's.
    settings = dotted_settings(OmegaConf.to_container(cfg, resolve=False))
    missing = sorted((key for key, value in settings.items() if value == "???"), key=_config_order(cfg))
    if missing:
        raise UserError(
            f"{', '.join(missing)} must be set (the config leaves {'it' if len(missing) == 1 else 'them'} as ???); "
            f"add {missing[0]}=... to the command line"
        )


def _config_order(cfg: DictConfig):
    """Sort key: a dotted key's position in the config, as the keys are listed in the file."""
    order = {key: i for i, key in enumerate(dotted_settings(OmegaConf.to_container(cfg, resolve=False)))}
    return lambda key: order.get(key, len(order))


def check_numbers(cfg: DictConfig) -> None:
    absent = object()
    for key, (kind, nullable) in NUMERIC_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent or (value is None and nullable):
            continue
        if not _is_number(value, kind):
            wanted = "an integer" if kind is int else "a number"
            raise UserError(f"{key}={value!r} is not {wanted}{' (or null)' if nullable else ''}")
        if not math.isfinite(value):  # inf and nan pass as floats, and break every computation they reach
            raise UserError(f"{key}={value!r} is not a finite number")
        if key in NUMERIC_RANGES:
            low, high, meaning = NUMERIC_RANGES[key]
            if low is None and value > high:
                raise UserError(f"{key}={value!r} is above {high}: {meaning}")
            if low is not None and not low <= value <= high:
                raise UserError(f"{key}={value!r} is outside [{_bound(low)}, {_bound(high)}]: {meaning}")


def _bound(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"  # 1048576, not 1.04858e+06


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def check_mappings(cfg: DictConfig) -> None:
    for key, example in MAPPING_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, DictConfig):
            raise UserError(
                f"{key}={value!r} must be a group of settings, not a value; set one of its keys instead ({example})"
            )


def check_seed(seed: int) -> None:
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise UserError(f"seed={seed} must be an integer in [{low}, {high}]")


# ---- composing ----------------------------------------------------------------------------
def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """The config Hydra will compose for these overrides (no job, nothing written)."""
    # hydra on first use (~0.1 s): the report imports this module, and composes only to pair runs
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return hydra_compose(config_name, overrides=list(overrides))


def dotted_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as plain containers -> {dotted key: value} of its leaves (an empty group is a leaf)."""
    if isinstance(tree, dict) and tree:
        return {
            k: v
            for name, value in tree.items()
            for k, v in dotted_settings(value, f"{prefix}{name}.").items()
        }
    return {prefix[:-1]: tree}
