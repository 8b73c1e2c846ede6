"""Fit, solve, or solve then fit: what a run does between building and writing its results.

The mode's facts decide (`methods.mode_facts.Mode.head_solve`): a linear probe solves for its head
instead of a fit, LP-FT solves for it before an ordinary fit (its probe state validated, saved and
ranked with the epochs' checkpoints), every other mode fits. A finished run resumed with no epoch
left to train is only tested. metrics.json's `best_checkpoint` names the checkpoint tested.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from transferlab.callbacks.guards import TrainingClock, standalone_checkpoints
from transferlab.data.features import feature_cache_on
from transferlab.methods.modes import TransferMode
from transferlab.methods.neighbors import (
    is_neighbor_mode,
    neighbors_from_config,
    solve_neighbors_instead_of_fit,
)
from transferlab.methods.probe import (
    probe_from_config,
    probe_head_before_fit,
    solve_instead_of_fit,
    validate_probe_state,
)
from transferlab.run.results import (
    best_checkpoint_entry,
    best_checkpoint_path,
    test_best,
    test_without_training,
    whole_train_time,
)
from transferlab.run.resume import ResumePlan
from transferlab.store.rundir import RunDir, checkpoint_path
from transferlab.utils.numbers import as_number


def fit_or_solve(cfg: DictConfig, built, output_dir: Path, plan: ResumePlan | None) -> dict:
    """The run's metrics: train/*, val/*, test/* (with `test`), epochs, train_time_s, best_checkpoint."""
    trainer, model, datamodule, mode = built.trainer, built.model, built.datamodule, built.mode
    test = bool(cfg.get("test", True))
    if mode.head_solve == "instead_of_fit" and is_neighbor_mode(cfg.mode):  # kNN / NCM (methods/neighbors.py)
        classifier = neighbors_from_config(cfg.mode)
        checkpoint = RunDir(output_dir).solved(classifier.solver)
        metrics = solve_neighbors_instead_of_fit(trainer, model, datamodule, classifier, checkpoint, test)
        return {**metrics, **best_checkpoint_entry(checkpoint, output_dir)}
    if mode.head_solve == "instead_of_fit":  # one L-BFGS solve, no epochs (methods/probe.py)
        probe = probe_from_config(cfg.mode)
        checkpoint = RunDir(output_dir).probe
        metrics = solve_instead_of_fit(
            trainer, model, datamodule, probe, built.feature_device, checkpoint, test
        )
        return {**metrics, **best_checkpoint_entry(checkpoint, output_dir)}
    if mode.head_solve == "before_fit":  # LP-FT: the probe sets the head, then an ordinary fit
        use_disk = feature_cache_on(cfg.data)
        built.features_time_s += probe_head_before_fit(
            trainer,
            model,
            datamodule,
            probe_from_config(cfg.mode),
            built.feature_device,
            use_disk,
            resuming=plan is not None,
        )
        training_clock(trainer).features = built.features_time_s  # the probe state's checkpoint records it
        if plan is None:  # the probe state is validated and saved; it is the best until an epoch beats it
            validate_probe_state(trainer, model, datamodule, RunDir(output_dir).probe_state)
    if plan is not None and not plan.trains:
        # A finished run resumed to be tested (e.g. the chosen trial of a search): nothing to train.
        # A fit killed after its last epoch may have left checkpoints that refer to their backbone file
        # (store.backbone_file), and no fit runs here to make them stand alone; what trains is the
        # mode's at the last epoch (params_trainable), as a fit would have left it.
        standalone_checkpoints(trainer)
        for callback in (c for c in trainer.callbacks if isinstance(c, TransferMode)):
            callback.apply(model, epoch=max(plan.epochs_done - 1, 0))
        return test_without_training(trainer, model, datamodule, plan)
    resume_from = checkpoint_path(cfg.ckpt_path, output_dir)
    training_clock(trainer).features = built.features_time_s  # into every checkpoint the fit saves
    trainer.fit(model, datamodule=datamodule, ckpt_path=None if resume_from is None else str(resume_from))
    metrics = {
        k: as_number(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))
    }
    metrics.update(best_checkpoint_entry(best_checkpoint_path(trainer), output_dir))
    if test:
        metrics.update(test_best(trainer, model, datamodule))
    metrics.update(epochs=trainer.current_epoch, train_time_s=round(whole_train_time(trainer, plan), 3))
    return metrics


def training_clock(trainer) -> TrainingClock:
    return next(c for c in trainer.callbacks if isinstance(c, TrainingClock))
