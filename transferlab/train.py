"""One job of `python -m transferlab`: build data + model + trainer, fit, test, write.

The configs (`conf/`) do the composing, `transferlab.build` checks and instantiates what they
describe, and this file only runs it: refuse bad input before anything starts, fit or solve
(`run.fit`), write `metrics.json`, and return the metric a sweeper optimizes.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from transferlab.build import build, check_config
from transferlab.cli.sweeps import job_failures_handled
from transferlab.data.features import feature_cache_on
from transferlab.methods.probe import probe_record
from transferlab.run.budget import check_validates
from transferlab.run.calibration import calibrate_after_test
from transferlab.run.confusion import per_class_results
from transferlab.run.fit import fit_or_solve
from transferlab.run.hparams import log_hyperparameters
from transferlab.run.interrupts import ctrl_c_reported
from transferlab.run.results import optimized_metric, whole_features_time, write_results
from transferlab.run.robustness import evaluate_corruptions, with_corruption_results
from transferlab.store.lock import TRAIN, owned
from transferlab.utils.errors import user_errors_as_one_line
from transferlab.utils.quietlogs import quiet_third_party, route_lightning_logs_through_root

log = logging.getLogger("transferlab")


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job of `python -m transferlab` (transferlab.__main__ checked the command line)."""
    try:
        # The job's run dir, owned from the job's start: a single run named on the command line owns
        # it since before Hydra (this is the same lock); the default run dir and each job of a sweep
        # (-m) only from here, after Hydra has written the job's .hydra/ (and opened its log). Two
        # sweeps into one hydra.sweep.dir started together can still overwrite each other's .hydra/
        # before the second is refused here (one line, exit 2, the sweep ends: its other jobs would
        # collide too); a sweep dir whose jobs are being written is refused before Hydra.
        # Inside it, in a sweep, a failed job is recorded in its folder and the other jobs run.
        with user_errors_as_one_line(), owned(cfg.paths.output_dir, TRAIN), job_failures_handled():
            return run(cfg)
        return None  # a sweep's failed job (recorded)
    finally:
        release_memory()  # sweeps run many jobs in one process


def run(cfg: DictConfig) -> float | None:
    output_dir = Path(cfg.paths.output_dir)
    route_lightning_logs_through_root()
    quiet_third_party()
    plan = check_config(cfg, output_dir)
    if plan is not None and plan.nothing_to_do:
        log.info("%s", plan.describe())
        return plan.previous_metrics().get(optimized_metric(cfg))
    # verbose=False: Lightning would print the seed on stderr, where only errors belong.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed: %s", cfg.seed)

    built = build(cfg, output_dir)
    trainer, model, datamodule = built.trainer, built.model, built.datamodule
    if plan is None or plan.trains:
        check_validates(cfg.trainer, datamodule)
    log_hyperparameters(trainer, cfg)
    with ctrl_c_reported(trainer, output_dir):
        metrics = fit_or_solve(cfg, built, output_dir, plan)
    # After a test: test/acc_per_class, and confusion_matrix.csv/.png in the run dir (nothing without a test).
    metrics.update(per_class_results(trainer, model, output_dir))
    # After a test: reliability.png; with calibration.temperature=auto the temperature fitted on
    # validation, the calibrated test metrics, and the tested checkpoint records the temperature.
    calibration = calibrate_after_test(
        cfg.get("calibration"), trainer, model, datamodule, output_dir, metrics.get("best_checkpoint")
    )
    metrics.update(calibration.metrics)
    # After a test, with eval.corruptions: the tested weights on corrupted test images (test_c/*); a
    # finished run's earlier corruption results are replaced, never mixed with these.
    use_disk = feature_cache_on(cfg.data)
    corruption_metrics, evaluation = evaluate_corruptions(
        cfg.get("eval"), trainer, model, datamodule, use_disk
    )
    if evaluation is not None:
        metrics = with_corruption_results(metrics, corruption_metrics)
    metrics.update(
        # Computing (or loading) cached backbone features happens before fit: counted apart.
        # the whole run's: a resumed LP-FT run does not repeat the first process's probe features
        features_time_s=round(whole_features_time(trainer, plan, built.features_time_s), 3),
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if trainer.is_global_zero:
        # linear_probe / lp_ft: the L2 grid and the choice go into run_info.json
        write_results(
            cfg,
            output_dir,
            metrics,
            plan,
            probe=probe_record(trainer),
            calibration=calibration.record,
            evaluation=evaluation,
            backbone_weights=model.backbone.weights_source,
            precision=str(trainer.precision),
        )
    return metrics.get(optimized_metric(cfg))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
