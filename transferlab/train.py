"""`python -m transferlab`: compose the config, build data + model + trainer, fit, test, write.

The configs (`conf/`) do the composing, `transferlab.build` checks and instantiates what they
describe, and this file only runs it: refuse bad input before anything starts, fit or solve
(`run.fit`), write `metrics.json`, and return the metric a sweeper optimizes.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from transferlab.build import build, check_config
from transferlab.cli.overrides import (
    check_command_line,
    resume_before_hydra,
    resume_overrides,
    run_dir_owned_before_hydra,
)
from transferlab.cli.sweeps import exit_if_jobs_failed, job_failures_handled
from transferlab.config import config_dir
from transferlab.methods.probe import probe_record
from transferlab.run.budget import check_validates
from transferlab.run.calibration import calibrate_after_test
from transferlab.run.confusion import per_class_results
from transferlab.run.fit import fit_or_solve
from transferlab.run.hparams import log_hyperparameters
from transferlab.run.interrupts import ctrl_c_reported
from transferlab.run.results import optimized_metric, write_results
from transferlab.store.lock import TRAIN, owned
from transferlab.utils.errors import full_tracebacks_when_debugging, user_errors_as_one_line
from transferlab.utils.quietlogs import quiet_third_party, route_lightning_logs_through_root

log = logging.getLogger("transferlab")


def main(cfg: DictConfig | None = None) -> float | None:
    """`python -m transferlab` and the `transferlab` command: check the run dir, then run Hydra."""
    if cfg is None:
        full_tracebacks_when_debugging()
        argv = sys.argv[1:]
        # Before Hydra: it saves .hydra/config.yaml into the run dir before `run` could refuse it.
        with user_errors_as_one_line():
            check_command_line(argv)
            added, plan = resume_before_hydra(argv)
            argv += added  # an older run resumes as it ran
        if plan is not None and plan.nothing_to_do:
            print(f"transferlab: {plan.describe()}", flush=True)  # and Hydra never starts: nothing written
            return None
        sys.argv = [sys.argv[0], *argv, *resume_overrides(argv)]
        # One owner of the run dir, taken before Hydra writes .hydra/ into it (store.lock).
        with run_dir_owned_before_hydra(argv, TRAIN):
            try:
                result = hydra_main(cfg)
            except SystemExit:
                exit_if_jobs_failed()  # a sweeper that gave up (Hydra printed why): still name the failed jobs
                raise
        exit_if_jobs_failed()  # after a sweep (-m): one summary line, exit 1
        return result
    return hydra_main(cfg)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
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
    metrics.update(
        # Computing (or loading) cached backbone features happens before fit: counted apart.
        features_time_s=round(built.features_time_s, 3),
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if trainer.is_global_zero:
        # linear_probe / lp_ft: the L2 grid and the choice go into run_info.json
        write_results(
            cfg, output_dir, metrics, plan, probe=probe_record(trainer), calibration=calibration.record
        )
    return metrics.get(optimized_metric(cfg))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
