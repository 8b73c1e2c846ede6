"""`python -m transferlab`: compose the config, build data + model + trainer, fit, test, write.

The configs (`conf/`) do the composing, `transferlab.build` instantiates what they describe,
and this file only runs it: refuse bad input before anything starts, fit (or resume), test
the best checkpoint, write `metrics.json`, and return the metric a sweeper optimizes.
"""

from __future__ import annotations

import gc
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from transferlab.build import build
from transferlab.confusion import per_class_results
from transferlab.errors import full_tracebacks_when_debugging, user_errors_as_one_line
from transferlab.linear_probe import probe_head_before_fine_tuning, probe_record, run_linear_probe
from transferlab.hparams import log_hyperparameters
from transferlab.results import as_number, test_best, test_without_training, whole_train_time, write_results
from transferlab.quietlogs import quiet_third_party
from transferlab.runinfo import config_dir, route_lightning_logs_through_root
from transferlab.sweeps import exit_if_jobs_failed, in_sweep, run_sweep_job
from transferlab.budget import check_validates
from transferlab.command_line import check_command_line
from transferlab.resume import checkpoint_path, resume_overrides, resume_plan_before_hydra
from transferlab.settings import check_config

log = logging.getLogger("transferlab")


def main(cfg: DictConfig | None = None) -> float | None:
    """`python -m transferlab` and the `transferlab` command: check the run dir, then run Hydra."""
    if cfg is None:
        full_tracebacks_when_debugging()
        argv = sys.argv[1:]
        # Before Hydra: it saves .hydra/config.yaml into the run dir before `run` could refuse it.
        with user_errors_as_one_line():
            check_command_line(argv)
            plan = resume_plan_before_hydra(argv)
        if plan is not None and plan.nothing_to_do:
            print(f"transferlab: {plan.describe()}", flush=True)  # and Hydra never starts: nothing written
            return None
        sys.argv += resume_overrides(argv)
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
        if in_sweep():  # a failed job is recorded in its folder; the other jobs run
            return run_sweep_job(run, cfg)
        with user_errors_as_one_line():  # also a UserError that hydra.utils.instantiate wrapped
            return run(cfg)
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
    if cfg.mode.name == "lp_ft":  # LP-FT's probe stage sets the head, then an ordinary fine-tuning fit
        probe_head_before_fine_tuning(cfg, built, resuming=plan is not None)
    with ctrl_c_reported(trainer, output_dir):
        if cfg.mode.name == "linear_probe":  # one L-BFGS solve, no epochs (transferlab/linear_probe.py)
            metrics = run_linear_probe(cfg, built, output_dir)
        elif plan is None or plan.trains:
            trainer.fit(model, datamodule=datamodule, ckpt_path=_str(checkpoint_path(cfg.ckpt_path, output_dir)))
            metrics = {k: as_number(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
            if cfg.get("test", True):
                metrics.update(test_best(trainer, model, datamodule))
            metrics.update(epochs=trainer.current_epoch, train_time_s=round(whole_train_time(trainer, plan), 3))
        else:
            # A finished run resumed to be tested (e.g. the chosen trial of a search): nothing to train.
            metrics = test_without_training(trainer, model, datamodule, plan)
    # After a test: test/acc_per_class, and confusion_matrix.csv/.png in the run dir (nothing without a test).
    metrics.update(per_class_results(trainer, model, output_dir))
    metrics.update(
        # Computing (or loading) cached backbone features happens before fit: counted apart.
        features_time_s=round(built.features_time_s, 3),
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if trainer.is_global_zero:
        # linear_probe / lp_ft: the L2 grid and the choice go into run_info.json
        write_results(cfg, output_dir, metrics, plan, probe=probe_record(trainer))
    return metrics.get(optimized_metric(cfg))


#: the shell's exit status for a command stopped by Ctrl-C (128 + SIGINT)
INTERRUPTED_EXIT = 130


@contextmanager
def ctrl_c_reported(trainer: L.Trainer, output_dir: Path) -> Iterator[None]:
    """Ctrl-C: one line saying how to resume, exit 130.

    Lightning catches the KeyboardInterrupt inside fit/test, marks `trainer.interrupted`
    and calls sys.exit(1) silently; outside them it arrives as a KeyboardInterrupt.
    """
    try:
        yield
    except KeyboardInterrupt:
        _exit_interrupted(output_dir)
    except SystemExit:
        if trainer.interrupted:
            _exit_interrupted(output_dir)
        raise


def _exit_interrupted(output_dir: Path) -> None:
    # Without a checkpoint yet, ckpt_path=last starts the run over in the same folder (checkpoint_path).
    saved = "" if (output_dir / "checkpoints" / "last.ckpt").is_file() else " (no checkpoint saved yet: it starts over)"
    print(f"transferlab: interrupted; resume with ckpt_path=last hydra.run.dir={output_dir}{saved}", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_EXIT)


def optimized_metric(cfg: DictConfig) -> str:
    return cfg.get("optimized_metric") or "val/acc_best"


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
