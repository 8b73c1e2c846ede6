"""Resuming a run: which checkpoint, whether it belongs to this experiment, and what is left to do.

A resume must repeat the run's settings: the config the checkpoint was trained with is the
reference, and only settings that change no trained number (RESUME_MAY_CHANGE) may differ;
`trainer.max_epochs` may only be raised. The checks run twice with the same code: before
Hydra for a resume in place (`cli.overrides.resume_before_hydra`: a refused resume must
leave the run dir as it was) and in `build.check_config` on the composed config (`check_resume`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from transferlab.config import config_dir, dotted_settings
from transferlab.run.precision import (
    check_resumed_precision,
    cuda_available_now,
    resolve_precision,
    same_precision,
)
from transferlab.store.rundir import ResumeSource, RunDir, recorded_best_path, resume_source
from transferlab.utils.errors import UserError

#: settings a resume may change: where the run reads its data and executes, what it prints,
#: and what happens after training; none of them changes a trained number. Everything else
#: (data, subset, backbone, head, mode, optimizer, scheduler, seed, model, the trainer's
#: precision, devices, ...) defines the experiment. `trainer.max_epochs` may only be raised.
RESUME_MAY_CHANGE = (
    "ckpt_path",
    "test",
    "optimized_metric",
    "task_name",
    "paths.output_dir",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.eval_batch_size",
    "data.in_memory",
    "trainer.accelerator",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "callbacks.progress_bar",
    "callbacks.epoch_log",
    "model.compile",
    "model.channels_last",
    # bookkeeping that changes no trained number (runs from before these existed stay resumable)
    "callbacks.model_checkpoint._target_",
    "callbacks.last_checkpoint._target_",
    "callbacks.schedule_follows_budget",
    "label",  # the run's name in report tables and legends
    # temperature scaling after the test (issue 21): no trained number changes, not even the accuracy;
    # a finished run resumed with ckpt_path=last test=true calibration.temperature=auto calibrates
    "calibration",
    # the corruption evaluation after the test (issue 21): the tested weights on corrupted images; a
    # finished run resumed with ckpt_path=last eval=corruptions evaluates them
    "eval",
)
#: settings that moved: old key -> new key. A checkpoint written before the move recorded the
#: old key (and the new one as an interpolation of it); it is compared under the new name.
RENAMED_SETTINGS = {
    "mode.backbone_lr_ratio": "model.backbone_lr_ratio",
    "mode.layer_decay": "model.layer_decay",
}
#: settings added since: key -> the value that does what runs did before the key existed (or a
#: function of the recorded settings that gives it). A checkpoint recorded without the key is
#: compared as if it had this value.
ADDED_SETTINGS = {
    "regularizer.name": "none",  # the regularizer group (issue 15): no penalty
    "model.label_smoothing": 0.0,  # issue 19: runs before it trained on plain cross-entropy
    # a mode's facts, stated in conf/mode/*.yaml since the layout of issue 23: what its name meant then
    "mode.backbone_fixed": lambda recorded: _facts_of(recorded.get("mode.name"))["backbone_fixed"],
    "mode.head_solve": lambda recorded: _facts_of(recorded.get("mode.name"))["head_solve"],
    # TrainAll's BatchNorm rule (issue 19): before it, TrainAll (finetune, scratch, lp_ft) put every
    # BatchNorm in train mode, what `train_bn: true` does; lp_ft now passes `${mode.train_bn}` (false)
    "mode.callback.train_bn": True,
}


def check_checkpoint_matches(source: ResumeSource, cfg: DictConfig) -> None:
    """The checkpoint to resume must be a Lightning checkpoint of a run on the same dataset.

    Whether its tensors fit this run's model is checked once the model exists
    (`transferlab.callbacks.guards.CheckpointFitsModel`): only the model knows its shapes.
    """
    trained_on = (source.record.get("data") or {}).get("dataset")
    dataset = _dataset_name(cfg.data)
    if trained_on is not None and dataset is not None and trained_on != dataset:
        path = source.checkpoint
        raise UserError(
            f"ckpt_path={path} was trained on {trained_on}, but this run uses {dataset}; resume with the settings "
            f"of the interrupted run (its .hydra/overrides.yaml), or use backbone.weights={path} to start a new "
            f"run from its backbone"
        )


def check_record_agrees(source: ResumeSource) -> None:
    """The checkpoint's recorded config and its run dir's `.hydra/config.yaml` (how the run began)
    must describe one experiment: a checkpoint copied in from another run, or a config.yaml edited
    by hand, would otherwise resume as a run whose record says something else than what trained.

    Settings a resume may change (RESUME_MAY_CHANGE, a raised `trainer.max_epochs`) may differ;
    a checkpoint outside a run dir, or from before checkpoints recorded their config, has nothing
    to disagree with.
    """
    recorded = source.record.get("config")
    run_dir = source.checkpoint.resolve().parent.parent
    if not isinstance(recorded, dict) or source.checkpoint.resolve().parent.name != "checkpoints":
        return
    began = RunDir(run_dir).saved_config()  # a broken file is refused here in one line
    if began is None:
        return
    changed = config_changes(OmegaConf.create(recorded), began)
    if changed:
        raise UserError(
            f"ckpt_path={source.checkpoint} does not match its run dir's {RunDir(run_dir).config}: "
            f"{', '.join(changed[:4])}{f' (and {len(changed) - 4} more)' if len(changed) > 4 else ''} "
            f"(checkpoint -> config.yaml); the checkpoint is from another run or the file was edited: restore the "
            f"run's own checkpoint or config.yaml, or start a new run (a new hydra.run.dir) from "
            f"backbone.weights={source.checkpoint}"
        )


def check_best_is_there(source: ResumeSource, run_dir: Path) -> None:
    """A checkpoint of this run dir whose recorded best checkpoint is gone: Lightning would keep the
    path it records, and the run would test (and report) that file, which in a copied run dir is
    the original run's. Another folder's checkpoint keeps its best beside it, where the resume finds it."""
    checkpoint = source.checkpoint.resolve()
    if checkpoint.parent != RunDir(run_dir).checkpoints.resolve():
        return
    best = recorded_best_path(checkpoint)
    if best is not None and not best.is_file():
        raise UserError(
            f"ckpt_path={source.checkpoint} records {best.name} as the run's best checkpoint, which is missing "
            f"from {best.parent}; restore it (a copied run dir: from the run it was copied from), or start a "
            f"new run (a new hydra.run.dir)"
        )


def _dataset_name(data: DictConfig) -> str | None:
    return getattr(get_class(data._target_), "name", None)


# ---- what is left to do ----------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePlan:
    """A resume of the run in `run_dir` from `checkpoint`."""

    run_dir: Path
    checkpoint: Path
    epochs_done: int  # epochs the checkpoint finished
    max_epochs: int  # this command's budget
    previous_max_epochs: int  # the budget the run last trained to
    finished: bool  # metrics.json is there
    test: bool  # this command tests the best checkpoint
    calibrates: bool = False  # and fits a temperature after the test (calibration.temperature=auto)
    evaluation: dict | None = None  # and evaluates these corruptions after it (run_info.json's `eval`)

    @property
    def budget_raised(self) -> bool:
        return self.max_epochs > self.previous_max_epochs

    @property
    def trains(self) -> bool:
        return self.epochs_done < self.max_epochs and (not self.finished or self.budget_raised)

    def previous_metrics(self) -> dict:
        return RunDir(self.run_dir).read_metrics() if self.finished else {}

    @property
    def nothing_to_do(self) -> bool:
        """A finished run with no epoch left to train, no test left to run and no temperature left to fit."""
        previous = self.previous_metrics()
        untested = self.test and not any(k.startswith("test/") for k in previous)
        uncalibrated = self.test and self.calibrates and "temperature" not in previous
        unevaluated = (
            self.test
            and self.evaluation is not None
            and RunDir(self.run_dir).read_run_info().get("eval") != self.evaluation
        )
        return self.finished and not self.trains and not untested and not uncalibrated and not unevaluated

    def describe(self) -> str:
        return (
            f"{self.run_dir} already trained {_epochs(self.epochs_done)} of trainer.max_epochs={self.previous_max_epochs} "
            f"and wrote its metrics.json; nothing to do, nothing written (raise trainer.max_epochs to train longer)"
        )


def check_resume(cfg: DictConfig, output_dir: Path) -> ResumePlan | None:
    """For a command that resumes (`ckpt_path`), the refusals and what is left to do; else None."""
    source = resume_source(cfg.get("ckpt_path"), output_dir)  # what is on disk, read once
    if source is None:
        return None
    check_checkpoint_matches(source, cfg)
    check_record_agrees(source)
    check_best_is_there(source, output_dir)
    plan = resume_plan(cfg, output_dir, source)
    # trainer.precision=auto may resolve otherwise on another machine: the resolved values must agree
    resolved = resolve_precision(cfg.trainer, cuda_available=cuda_available_now)
    check_resumed_precision(source.record.get("precision"), resolved, source.checkpoint)
    return plan


def resume_plan(cfg: DictConfig, run_dir: Path, source: ResumeSource) -> ResumePlan:
    """Refuse a resume that would change the experiment, else say what is left to do.

    The config the checkpoint was trained with is the reference (`store.rundir.trained_config`),
    wherever the resume runs: a resume that changed the few-shot size, the classes or the learning
    rate would end as a mix of two experiments under the first one's name.
    """
    checkpoint, saved, epochs_done = source.checkpoint, source.trained_config, source.epochs_done
    if saved is not None:
        # a checkpoint that records the precision it trained in is judged by it (check_resumed_precision):
        # `auto` and the value it resolved to are the same setting
        judged_apart = ("trainer.precision",) if source.record.get("precision") is not None else ()
        changed = config_changes(saved, cfg, judged_apart)
        if changed:
            raise UserError(
                f"resuming {checkpoint} with settings that change the experiment: {', '.join(changed[:6])}"
                f"{f' (and {len(changed) - 6} more)' if len(changed) > 6 else ''}; resume with the run's own settings "
                f"(its .hydra/overrides.yaml{_as_it_ran(saved, cfg)}), or start a new run (a new hydra.run.dir) "
                f"from backbone.weights={checkpoint}"
            )
    max_epochs = int(cfg.trainer.max_epochs)
    previous = max(source.budgets, default=max_epochs)  # the budget the run last trained to
    if max_epochs < previous:
        raise UserError(
            f"trainer.max_epochs={max_epochs} is lower than the run's {previous}; a resume may only raise it "
            f"(trainer.max_epochs>={previous})"
        )
    if max_epochs < epochs_done:
        raise UserError(
            f"ckpt_path={checkpoint} already trained {_epochs(epochs_done)}, more than trainer.max_epochs={max_epochs}; "
            f"set trainer.max_epochs>={epochs_done}"
        )
    return ResumePlan(
        run_dir,
        checkpoint,
        epochs_done,
        max_epochs,
        previous,
        source.finished,
        bool(cfg.get("test", True)),
        calibrates=_fits_temperature(cfg.get("calibration")),
        evaluation=_evaluation(cfg.get("eval")),
    )


def config_changes(saved: DictConfig, current: DictConfig, judged_apart: tuple[str, ...] = ()) -> list[str]:
    """The keys (dotted) whose value differs, or that only one of the configs has, outside RESUME_MAY_CHANGE.

    Compared unresolved, as written: `scheduler.T_max: ${trainer.max_epochs}` is the same
    setting in both, and its source key is compared on its own. A saved config from before a
    setting moved is read under the new names (RENAMED_SETTINGS), and so is the current one;
    one from before a setting existed has that setting's old behaviour (ADDED_SETTINGS), and a
    class that moved is compared under its current `_target_` (`models.architecture.RENAMED_TARGETS`).
    `judged_apart`: keys another check compares (the precision a checkpoint records).
    """
    settings = [dotted_settings(OmegaConf.to_container(c, resolve=False)) for c in (saved, current)]
    # a hand-made current config may lack the added settings too: both sides get them
    before, after = (_as_settings_are_now(side) for side in settings)
    keys = sorted(set(before) | set(after))
    return [
        f"{key} ({_shown(before.get(key, _ABSENT))} -> {_shown(after.get(key, _ABSENT))})"
        for key in keys
        if before.get(key, _ABSENT) != after.get(key, _ABSENT)
        and not _may_change(key)
        and key not in judged_apart
        and not (key == "trainer.precision" and same_precision(before.get(key), after.get(key)))
    ]


def settings_as_it_ran(saved: DictConfig, current: DictConfig) -> dict[str, str]:
    """The settings added since `saved` was recorded whose value in `current` differs from what the
    run did (ADDED_SETTINGS): key -> the override value that resumes it as it ran."""
    recorded, now = (
        _under_current_names(dotted_settings(OmegaConf.to_container(c, resolve=False)))
        for c in (saved, current)
    )
    before = _as_settings_are_now(dict(recorded))
    return {
        key: _override_value(before[key])
        for key in ADDED_SETTINGS
        if key not in recorded and key in now and now[key] != before[key] and not _may_change(key)
    }


def settings_of_changed_presets(
    saved: DictConfig, compose_with: Callable[[list[str]], DictConfig]
) -> list[str] | None:
    """For a run resumed with the command line it was started with, whose presets or defaults have
    changed since (the lite0 recipes chose new values on validation): the overrides that put back
    what it was recorded with, checked by composing them; None when no override can (then the
    resume is refused as any other mismatch). Group options are found by the `_target_` they set."""
    added: list[str] = []
    for _ in range(2):  # groups first (they bring their own keys), then the leaves left
        changed = _changed_settings(saved, compose_with(added))
        if not changed:
            return added
        groups = {key.rsplit(".", 1)[0] for key, _ in changed if key.endswith("._target_")}
        if groups:
            options = [_group_option(group, target) for group, target in _recorded_targets(saved, groups)]
            if None in options:
                return None
            added += options
            continue
        added += [_override_putting_back(key, value) for key, value in changed]
    return added if not _changed_settings(saved, compose_with(added)) else None


def _changed_settings(saved: DictConfig, current: DictConfig) -> list[tuple[str, Any]]:
    """(key, recorded value or _ABSENT) for each setting that differs outside RESUME_MAY_CHANGE."""
    before, after = (
        _as_settings_are_now(dotted_settings(OmegaConf.to_container(c, resolve=False)))
        for c in (saved, current)
    )
    return [
        (key, before.get(key, _ABSENT))
        for key in sorted(set(before) | set(after))
        if before.get(key, _ABSENT) != after.get(key, _ABSENT) and not _may_change(key)
    ]


def _recorded_targets(saved: DictConfig, groups: set[str]) -> list[tuple[str, Any]]:
    settings = dotted_settings(OmegaConf.to_container(saved, resolve=False))
    return [(group, settings.get(f"{group}._target_")) for group in sorted(groups)]


def _group_option(group: str, target: Any) -> str | None:
    """`group=option` for the option of conf/<group>/ whose `_target_` is `target` (one, else None)."""
    folder = config_dir() / group
    if "." in group or not folder.is_dir():
        return None
    found = [f.stem for f in sorted(folder.glob("*.yaml")) if OmegaConf.load(f).get("_target_") == target]
    return f"{group}={found[0]}" if len(found) == 1 else None


def _override_putting_back(key: str, value: Any) -> str:
    if value is _ABSENT:
        return f"~{key}"
    text = "null" if value is None else _override_value(value)
    if isinstance(value, str) and not re.fullmatch(r"[\w.:/${}-]+", value):
        text = "'" + value.replace("'", "\\'") + "'"
    return f"++{key}={text}"


def _as_it_ran(saved: DictConfig, current: DictConfig) -> str:
    """For a run recorded before some settings existed whose default now differs from what the run
    did: ", and KEY=VALUE ... : the run was recorded before KEY existed", the overrides that resume it as it ran."""
    missing = settings_as_it_ran(saved, current)
    if not missing:
        return ""
    overrides = " ".join(f"{key}={value}" for key, value in missing.items())
    return f", and {overrides}: the run was recorded before {', '.join(missing)} existed"


def _override_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _as_settings_are_now(settings: dict[str, Any]) -> dict[str, Any]:
    """Recorded dotted settings as today's config would spell them: moved keys and classes under
    their current names, added settings with the value that does what runs did before them."""
    settings = _under_current_names(settings)
    for key, value in ADDED_SETTINGS.items():
        if key not in settings:
            settings[key] = value(settings) if callable(value) else value
    return settings


# Imported when used, not with this module: the command line's checks (cli.overrides, before Hydra)
# run before Lightning and torch are imported (transferlab.__main__), and these modules import them.
def _facts_of(mode_name: Any) -> dict[str, Any]:
    from transferlab.methods.mode_facts import facts_before_they_were_stated

    return facts_before_they_were_stated(mode_name)


def _current_target(target: Any) -> Any:
    from transferlab.models.architecture import current_target

    return current_target(target)


def _fits_temperature(calibration: Any) -> bool:
    from transferlab.run.calibration import fits_temperature

    return fits_temperature(calibration)


def _evaluation(node: Any) -> dict | None:
    from transferlab.run.robustness import eval_settings

    settings = eval_settings(node)
    return None if settings is None else settings.record()


def _under_current_names(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with each moved key's value under its new key; the new key's old value was the
    interpolation `${old key}` (or absent), which now stands for the value itself."""
    settings = {
        key: _current_target(value) if key.endswith("._target_") else value for key, value in settings.items()
    }
    for old, new in RENAMED_SETTINGS.items():
        if old in settings and settings.get(new, f"${{{old}}}") == f"${{{old}}}":
            settings[new] = settings.pop(old)
    return settings


# ---- helpers ---------------------------------------------------------------------------------
_ABSENT = object()


def may_change_on_resume(key: str) -> bool:
    """A setting a resume may change (RESUME_MAY_CHANGE, and trainer.max_epochs, which it may raise)."""
    return _may_change(key)


def _may_change(key: str) -> bool:
    return any(
        key == allowed or key.startswith(allowed + ".")
        for allowed in RESUME_MAY_CHANGE + ("trainer.max_epochs",)
    )


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else str(value)
