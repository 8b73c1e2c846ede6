"""Callbacks that keep a run trustworthy: it stops when the loss diverges, it refuses to
resume from a checkpoint of a different model, and a resumed run continues exactly like the
uninterrupted one would have. All three are in `conf/callbacks/default.yaml`. A fourth,
`TrainingClock`, carries the training time across resumes, and `AtomicCheckpointIO` (a
checkpoint plugin) makes every save all-or-nothing; `transferlab.build.build_trainer` adds both
to every run (they are bookkeeping, not settings).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from transferlab.store.backbone_file import BY_REFERENCE, BackboneFile, make_standalone, with_backbone
from transferlab.store.files import STORAGE_ERRNOS, storage_error_behind, write_atomically
from transferlab.store.rundir import RunDir, checkpoint_path, read_checkpoint, relocated, transferlab_record
from transferlab.utils.errors import TrainingDiverged, UserError

log = logging.getLogger("transferlab")


class StopOnNonFiniteLoss(Callback):
    """Stop the run at the first NaN or infinite training loss, and never checkpoint after it.

    Asking the device whether a loss is finite waits for the GPU to finish the step, so the
    losses are checked in groups of `check_every_n_steps`, and always before a checkpoint is
    written: the weights of a diverged step can reach memory, never a file, so the last
    checkpoint on disk is the last good one.
    """

    def __init__(self, check_every_n_steps: int = 20):
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # (step, epoch, loss) not checked yet

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._pending.append((trainer.global_step + 1, trainer.current_epoch, loss.detach()))
        if len(self._pending) >= self.check_every_n_steps:
            self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)  # raising here aborts the save before anything is written

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        finite = torch.stack([torch.isfinite(loss).all() for _, _, loss in pending]).cpu()
        if bool(finite.all()):
            return
        first_bad = int((~finite).nonzero()[0])
        step, epoch, loss = pending[first_bad]
        raise TrainingDiverged(
            f"the training loss is {float(loss.float().mean().cpu())} at step {step} (epoch {epoch}); "
            f"training stopped and nothing after that step was saved ({_last_checkpoint(trainer)}); "
            f"lower optimizer.lr or check the data"
        )


def _last_checkpoint(trainer: L.Trainer) -> str:
    """The newest checkpoint any ModelCheckpoint wrote (conf/callbacks/default.yaml has two)."""
    written = [
        Path(p)
        for callback in trainer.checkpoint_callbacks
        for p in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", ""))
        if p and Path(p).is_file()
    ]
    if not written:
        return "no checkpoint had been saved yet"
    return f"the last good checkpoint is {max(written, key=lambda p: p.stat().st_mtime_ns)}"


class SeedEachEpoch(Callback):
    """Reseed every random number generator at the start of each training epoch from (seed, epoch).

    Lightning's checkpoints restore weights, optimizer, schedulers and loop counters but not
    the random number generators. Without this, an epoch's shuffle order, augmentation and
    dropout would depend on how many random numbers the earlier epochs drew, which a run
    resumed from `last.ckpt` never drew. With it, a run resumed at an epoch boundary repeats
    the uninterrupted run bit for bit. (A checkpoint saved in the middle of an epoch cannot:
    the batches already seen in that epoch are not recorded.)
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_seed = self.epoch_seed(trainer.current_epoch, trainer.global_rank)
        # The shuffle order is drawn from the global generator at the epoch's first batch.
        L.seed_everything(epoch_seed, workers=True, verbose=False)
        for loader in _train_loaders(trainer):
            # Creating an epoch's loader iterator draws a worker seed from `loader.generator`,
            # or from the global generator when it is None; a resumed run creates its first
            # iterator before this hook and the uninterrupted run after it. A private generator
            # keeps that draw off the global stream, so both runs see the same numbers.
            loader.generator = torch.Generator().manual_seed(epoch_seed)

    def epoch_seed(self, epoch: int, rank: int = 0) -> int:
        """Well-mixed, so nearby (seed, epoch) pairs never share a stream (seed 0 epoch 1 vs seed 1
        epoch 0); the rank keeps the processes of a multi-GPU run from augmenting in lockstep."""
        return int(np.random.SeedSequence([self.seed % 2**32, epoch, rank]).generate_state(1)[0])


def _train_loaders(trainer: L.Trainer) -> list[DataLoader]:
    loaders = trainer.train_dataloader
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    return [loader for loader in loaders or () if isinstance(loader, DataLoader)]


class CheckpointFitsModel(Callback):
    """Refuse to resume from a checkpoint whose tensors do not fit this run's model.

    Lightning would fail later with a multi-line state-dict error; this names the first
    tensor that differs. Runs in `setup`, before the checkpoint is restored and before any
    training step.
    """

    def __init__(self, ckpt_path: str | None = None, output_dir: str | None = None):
        self.ckpt_path = ckpt_path
        self.output_dir = Path(output_dir or ".")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        path = checkpoint_path(self.ckpt_path, self.output_dir)
        if path is None:
            return
        checkpoint = read_checkpoint(path, "ckpt_path")
        problem = class_difference(
            _recorded_classes(checkpoint), getattr(pl_module, "data_info", {}).get("class_names")
        )
        problem = problem or state_dict_difference(checkpoint.get("state_dict", {}), pl_module.state_dict())
        if problem:
            raise UserError(
                f"ckpt_path={path}{_provenance(checkpoint)} does not fit this run's model: {problem}; resume with "
                f"the settings of the interrupted run (its .hydra/overrides.yaml lists them)"
            )


def _provenance(checkpoint: dict) -> str:
    """ " (trained with backbone X on D)" from transferlab's record in the checkpoint, if it has one."""
    meta = transferlab_record(checkpoint)
    backbone, dataset = meta.get("backbone"), (meta.get("data") or {}).get("dataset")
    if not backbone:
        return ""
    return f" (trained with backbone {backbone}{f' on {dataset}' if dataset else ''})"


def _recorded_classes(checkpoint: dict) -> list[str] | None:
    return (transferlab_record(checkpoint).get("data") or {}).get("class_names")


def class_difference(saved: list[str] | None, own: list[str] | None) -> str | None:
    """Same number of classes is not enough: head output i must mean the same class in both runs."""
    if saved is None or own is None or list(saved) == list(own):
        return None
    return f"it was trained on the classes {_short(saved)}, this run has {_short(own)}"


def _short(names: list[str], limit: int = 6) -> str:
    shown = ",".join(names[:limit])
    return f"[{shown}{',...' if len(names) > limit else ''}] ({len(names)})"


class RunDirCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saved state follows its run dir when the dir is moved.

    Lightning's own drops the best score, the kept files and the last path of a checkpoint
    whose `dirpath` differs from this run's: after `mv runs/a runs/b` and a resume, any epoch
    would count as the best, the old best file would stay next to the new one, and the run
    would be tested on the wrong one. Paths under the old dirpath whose file is now under
    the new one are rewritten there; others (a checkpoint of another run, resumed into a new
    dir) keep their absolute paths: still comparable, and never deleted (Lightning only
    removes files under its own dirpath).
    """

    @property
    def state_key(self) -> str:
        # The same key as a plain ModelCheckpoint's: checkpoints written before this class still load.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict) -> None:
        old_dir = state_dict.get("dirpath")
        if old_dir and self.dirpath and old_dir != self.dirpath:
            state_dict = relocate_checkpoint_state(state_dict, old_dir, self.dirpath)
        super().load_state_dict(state_dict)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning warns that the checkpoint folder "exists and is not empty" at every fit that
        # finds files in it; a fresh LP-FT fit always finds its own probe state there.
        with warnings.catch_warnings():
            if _holds_only_probe_state(self.dirpath):
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        # LP-FT's probe state is an output of its own (RunDir.PROBE_STATE): an epoch that beats it
        # becomes the best checkpoint, and the probe state stays next to it.
        if Path(previous).name == RunDir.PROBE_STATE:
            return False
        return super()._should_remove_checkpoint(trainer, previous, current)


def _holds_only_probe_state(folder: str | None) -> bool:
    files = [p.name for p in Path(folder).iterdir()] if folder and Path(folder).is_dir() else []
    return files == [RunDir.PROBE_STATE]


def rank_checkpoint(trainer: L.Trainer, path: Path, metrics: dict[str, float]) -> list[str]:
    """Enter a checkpoint written outside `fit` (LP-FT's probe state) in the ranking of every
    `RunDirCheckpoint` that monitors one of `metrics`, as if it had saved it with them; returns
    the monitored metrics it was ranked by.

    Call it before the file is saved, so that the file records itself as the best so far. An epoch
    then replaces it as the best only with a strictly better score (ModelCheckpoint compares
    with > for mode=max, < for min), and the file is never removed (`_should_remove_checkpoint`).
    """
    ranked = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, RunDirCheckpoint) or callback.monitor not in metrics:
            continue
        if callback.save_top_k == 0:
            continue
        score = torch.tensor(float(metrics[callback.monitor]))
        callback.best_k_models[str(path)] = score
        best, worst = (min, max) if callback.mode == "min" else (max, min)
        if callback.save_top_k == -1 or len(callback.best_k_models) >= callback.save_top_k:
            callback.kth_best_model_path = worst(callback.best_k_models, key=callback.best_k_models.get)
            callback.kth_value = callback.best_k_models[callback.kth_best_model_path]
        callback.best_model_path = best(callback.best_k_models, key=callback.best_k_models.get)
        callback.best_model_score = callback.best_k_models[callback.best_model_path]
        callback.current_score = score
        ranked.append(callback.monitor)
    return ranked


def relocate_checkpoint_state(state: dict, old_dir: str, new_dir: str) -> dict:
    """ModelCheckpoint's state with its paths moved from `old_dir` to `new_dir` where the file is there now."""
    move = lambda path: relocated(path, old_dir, new_dir)  # noqa: E731
    state = dict(state, dirpath=new_dir)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if state.get(key):
            state[key] = move(state[key])
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {move(path): score for path, score in state["best_k_models"].items()}
    return state


class ScheduleFollowsBudget(Callback):
    """A resume with a raised trainer.max_epochs stretches a cosine schedule (or warmup + cosine) to the new budget.

    `CosineAnnealingLR(T_max=${trainer.max_epochs})` is built with the new budget, but
    Lightning then restores the checkpoint's scheduler, T_max included: the old schedule
    would reach 0 at the old last epoch and climb back up. After the restore, a scheduler
    whose T_max differs from the one the config built gets the config's, and every group
    that trains gets the new schedule's rate at the current epoch (from its base rate, which
    already holds its lr_scale); a frozen group stays at 0 (transferlab/methods/modes.py).
    """

    def __init__(self) -> None:
        self._configured: list[int | None] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Between configure_optimizers and the checkpoint's restore: the config's lengths.
        self._configured = [getattr(c.scheduler, "T_max", None) for c in trainer.lr_scheduler_configs]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config, t_max in zip(trainer.lr_scheduler_configs, self._configured):
            scheduler = config.scheduler
            if not t_max or getattr(scheduler, "T_max", t_max) == t_max:
                continue
            if hasattr(scheduler, "follow_budget"):  # transferlab's own schedules (models.schedules)
                scheduler.follow_budget(int(t_max))
            elif isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                stretch_cosine(scheduler, int(t_max))


def stretch_cosine(scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, t_max: int) -> None:
    """Continue `scheduler` at its current step as if it had been built with `T_max=t_max`.

    Sets the optimizer's rates, which training and LearningRateMonitor read; the scheduler's own
    record of them (`get_last_lr()`) follows at its next step, which starts from these rates.
    """
    scheduler.T_max = t_max
    factor = (1 + math.cos(math.pi * scheduler.last_epoch / t_max)) / 2
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        if any(p.requires_grad for p in group["params"]):
            group["lr"] = scheduler.eta_min + (base_lr - scheduler.eta_min) * factor


class ProbeRecord(Callback):
    """A probe stage's record (methods.probe: the linear probe's, or LP-FT's LP stage), kept in every
    checkpoint: a resumed LP-FT run still reports its probe."""

    def __init__(self, record: dict | None = None):
        self.record = dict(record or {})

    def state_dict(self) -> dict:
        return dict(self.record)

    def load_state_dict(self, state_dict: dict) -> None:
        self.record = dict(state_dict)


class TrainingClock(Callback):
    """The training time of the whole run, across resumes, and the time its cached features took.

    The time trained so far goes into every checkpoint, so a resumed run reports the
    interrupted part plus its own (the time after the last checkpoint was lost with the
    epochs it trained, which the resume repeats). The features' time goes in too: a resumed
    LP-FT run does not repeat its probe stage, whose features were the first process's.
    """

    def __init__(self) -> None:
        self.before = 0.0  # seconds trained before this process, read from the checkpoint
        self._restored = 0.0  # the last checkpoint's time, whatever stage restored it
        self.added = 0.0  # training done outside fit in this process (LP-FT's probe solve)
        self.features_before = 0.0  # features computed by the processes before this one
        self._features_restored = 0.0
        self.features = 0.0  # this process's (set before fit)
        self._started: float | None = None
        self._stopped: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._stopped = time.perf_counter(), None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only a fit resumes the clock: `trainer.test(ckpt_path=best)` restores callbacks too,
        # and taking the best epoch's time as "before" would count those epochs twice.
        # (on_train_start: after the checkpoint is restored, whichever the strategy's order.)
        self.before = self._restored
        self.features_before = self._features_restored

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stopped = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds trained by this process."""
        if self._started is None:
            return 0.0
        return (self._stopped or time.perf_counter()) - self._started

    def add(self, seconds: float) -> None:
        """Count training done outside `fit` (e.g. a solver run before it) in the run's time."""
        self.added += seconds

    def total(self) -> float:
        return self.before + self.added + self.elapsed()

    def features_total(self) -> float:
        """Seconds the run's cached features took, in every process that trained it."""
        return self.features_before + self.features

    def state_dict(self) -> dict[str, float]:
        return {"train_time_s": self.total(), "features_time_s": self.features_total()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._restored = float(state_dict.get("train_time_s", 0.0))
        # checkpoints written before the clock kept it: the features of those processes are unknown (0)
        self._features_restored = float(state_dict.get("features_time_s", 0.0))


def state_dict_difference(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """The first difference between two state dicts' keys and shapes, in words; None if they fit."""
    missing = [key for key in own if key not in saved]
    if missing:
        return f"the checkpoint has no {missing[0]} ({len(missing)} tensors missing)"
    unexpected = [key for key in saved if key not in own]
    if unexpected:
        return f"the checkpoint has {unexpected[0]}, which this model lacks ({len(unexpected)} such tensors)"
    for key, tensor in own.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            return f"{key} is {tuple(saved[key].shape)} in the checkpoint but {tuple(tensor.shape)} here"
    return None


class FrozenBackboneSavedOnce(Callback):
    """During a fit on cached features, checkpoints refer to one backbone file instead of holding
    the backbone (`store.backbone_file`: the head's epochs are otherwise mostly checkpoint writing);
    when the fit ends, or stops on Ctrl-C or an error, every checkpoint gets its backbone back."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == "fit" and backbone_never_changes(pl_module):
            checkpoint[BY_REFERENCE] = True  # AtomicCheckpointIO strips it, knowing the file's folder

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        standalone_checkpoints(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        standalone_checkpoints(trainer)


def standalone_checkpoints(trainer: L.Trainer) -> None:
    """Every checkpoint of the run holds its backbone again (`store.backbone_file.make_standalone`).
    Where that cannot be written (a full disk) they keep referring to the backbone file, which every
    reader resolves: one warning line, and the run goes on (its test still reads them)."""
    for folder in _checkpoint_folders(trainer):
        try:
            make_standalone(folder)
        except (OSError, RuntimeError, UserError) as error:
            reason = storage_error_behind(error) or error
            log.warning(
                "the checkpoints in %s still refer to their backbone file (%s); they are read through it, "
                "and a resume with ckpt_path=last where there is room makes them stand alone",
                folder,
                getattr(reason, "strerror", None) or type(reason).__name__,
            )


def backbone_never_changes(pl_module: L.LightningModule) -> bool:
    """A head trained on cached features: the backbone is never run, and none of it trains."""
    backbone = getattr(pl_module, "backbone", None)
    return (
        bool(getattr(pl_module, "inputs_are_features", False))
        and backbone is not None
        and not any(p.requires_grad for p in backbone.parameters())
    )


def _checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    return sorted(folders)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints through `write_atomically`: a run killed during a save keeps its
    previous `last.ckpt` intact instead of a truncated one. A checkpoint that may refer to its
    backbone (`FrozenBackboneSavedOnce`) is saved without it, and resolved again when read."""

    def __init__(self) -> None:
        super().__init__()
        self._backbone_file = BackboneFile()

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        return with_backbone(super().load_checkpoint(path, *args, **kwargs), Path(path))

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        try:
            if checkpoint.pop(BY_REFERENCE, False):  # the backbone file is written here, once
                checkpoint = self._backbone_file.refer(checkpoint, path.parent)
            write_atomically(path, lambda f: torch.save(checkpoint, f))
        except Exception as error:  # write_atomically has removed its temporary file
            full = storage_error_behind(error)
            if full is None:
                raise
            raise UserError(_checkpoint_storage_message(path, full)) from error


def _checkpoint_storage_message(path: Path, error: OSError) -> str:
    reason = error.strerror or os.strerror(error.errno)
    return (
        f"{STORAGE_ERRNOS[error.errno]} {path.parent} while writing checkpoint {path} ({reason}); "
        f"free space (or choose another hydra.run.dir) and resume with ckpt_path=last"
    )
