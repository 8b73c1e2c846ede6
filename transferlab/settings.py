"""The composed config, checked first thing in `run()`, before anything is built.

Each component checks its own settings (the trainer's budget: `transferlab.budget`; the mode:
`transferlab.callbacks.freeze.check_mode`; the data root: the data module's `check_root`;
resuming: `transferlab.resume`); `check_config` asks them in order, cheapest first. What stays
here is what no single constructor sees in time: values left as `???`, the types of numbers
typed on the command line (a typo like `data.batch_size=12a` would otherwise end in a
conversion error deep inside a constructor, or in Lightning), the seed, the metric a sweeper
optimizes, and a stand-in build of the optimizer, scheduler and head (the real ones are
built late: the optimizer only inside `trainer.fit`).

Checks that need the data or the network (class names, few-shot counts, image size) stay
where that knowledge lives (`transferlab.data`, `transferlab.models`); they still fail
before the trainer starts.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from transferlab.budget import check_training_budget
from transferlab.errors import UserError, bad_argument
from transferlab.resume import ResumePlan, check_resume
from transferlab.runinfo import check_output_dir, resumes

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
#: settings that must be groups of settings (or null), as `++data.fewshot=5` would replace one by a number
MAPPING_SETTINGS = {"data.fewshot": "data.fewshot.per_class=5 or data.fewshot.fraction=0.1"}
#: seeds that numpy (and so Lightning's seed_everything) accepts
SEED_RANGE = (0, 2**32 - 1)
#: scheduler steps tried on a stand-in optimizer before any data is read
SCHEDULER_TRIAL_STEPS = 3


def check_config(cfg: DictConfig, output_dir: Path) -> ResumePlan | None:
    """Every check on the composed config; for a resume, what is left to do (see `transferlab.resume`)."""
    from transferlab.callbacks.freeze import check_mode
    from transferlab.data.datamodule import check_data_root
    from transferlab.models.module import check_learning_rate_ratios

    check_output_dir(output_dir, resuming=resumes(cfg.get("ckpt_path")))
    check_required(cfg)
    check_numbers(cfg)
    check_mappings(cfg)
    check_seed(cfg.seed)
    check_training_budget(cfg.trainer, test=bool(cfg.get("test", True)))
    check_optimized_metric(cfg)
    check_mode(cfg)
    check_components(cfg)
    check_learning_rate_ratios(cfg.model.backbone_lr_ratio, cfg.model.layer_decay)
    check_data_root(cfg.data)
    return check_resume(cfg, output_dir)


def check_required(cfg: DictConfig) -> None:
    """Settings a config leaves as `???` (an experiment's `source`, `backbone=torchvision`'s name)."""
    missing = sorted(OmegaConf.missing_keys(cfg), key=_config_order(cfg))
    if missing:
        raise UserError(
            f"{', '.join(missing)} must be set (the config leaves {'it' if len(missing) == 1 else 'them'} as ???); "
            f"add {missing[0]}=... to the command line"
        )


def _config_order(cfg: DictConfig):
    """Sort key: a dotted key's position in the config, as the keys are listed in the file."""
    from transferlab.command_line import dotted_settings

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


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def check_mappings(cfg: DictConfig) -> None:
    for key, example in MAPPING_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, DictConfig):
            raise UserError(f"{key}={value!r} must be a group of settings, not a value; set one of its keys instead ({example})")


def check_seed(seed: int) -> None:
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise UserError(f"seed={seed} must be an integer in [{low}, {high}]")


def check_optimized_metric(cfg: DictConfig) -> None:
    """The value a sweeper optimizes must be one the run measures."""
    metric = cfg.get("optimized_metric")
    if metric and str(metric).startswith("test/") and not cfg.get("test", True):
        raise UserError(f"optimized_metric={metric} is only measured with test=true; optimize a val/ metric (val/acc_best)")
    logged = logged_metrics()
    if metric and str(metric) not in logged:
        import difflib

        close = difflib.get_close_matches(str(metric), logged, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"optimized_metric={metric} is not a metric of the run; {hint}the run logs {', '.join(logged)}")


def logged_metrics() -> list[str]:
    """The names TransferModule logs (its `self.log("...")` calls), read from its source so the
    list cannot drift from the model; reading the file keeps torch unimported here."""
    import importlib.util
    import re

    origin = importlib.util.find_spec("transferlab.models.module").origin
    return sorted(set(re.findall(r"""self\.log\(\s*["']([^"']+)["']""", Path(origin).read_text())))


def check_components(cfg: DictConfig) -> None:
    """Build the optimizer, scheduler and head once with stand-in inputs, before any data is read.

    Their constructors check their own arguments (torch.optim's "Invalid learning rate", a
    head's hidden size), but the real ones are built late: the optimizer only inside
    `trainer.fit`. A refusal here reads `<group>: <reason>`.
    """
    import torch
    from hydra.utils import instantiate

    momentum = cfg.optimizer.get("momentum")
    if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
        raise UserError(f"optimizer.momentum={momentum} must be in [0, 1) (0.9 is usual); at 1 or above the updates grow without bound")
    with _building("optimizer"):
        optimizer = instantiate(cfg.optimizer)([torch.zeros(1, requires_grad=True)])
    if cfg.get("scheduler"):
        with _building("scheduler"):
            scheduler = instantiate(cfg.scheduler)(optimizer)
            # A few steps too: StepLR(step_size=0) only fails (ZeroDivisionError) once it steps.
            for _ in range(SCHEDULER_TRIAL_STEPS):
                optimizer.step()
                scheduler.step()
    with _building("head"):
        instantiate(cfg.head, in_features=8, num_classes=2)


@contextmanager
def _building(component: str) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        refusal = bad_argument(component, error)
        if refusal is None:
            raise
        raise refusal from error
