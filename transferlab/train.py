"""`python -m transferlab`: compose the config, build data + model + trainer, fit, test.

The configs (`conf/`) do the composing; this file only instantiates what they describe,
in the order the pieces depend on each other: backbone (its weights decide the default
normalization) -> data (its classes decide the head) -> head -> module -> trainer.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import full_tracebacks_when_debugging, user_errors_as_one_line
from transferlab.features import cache_features, should_cache
from transferlab.models import TransferModule
from transferlab.normalization import describe_weights
from transferlab.runinfo import config_dir, route_lightning_logs_through_root, run_info
from transferlab.callbacks.guards import TrainingClock
from transferlab.sweeps import exit_if_jobs_failed, in_sweep, run_sweep_job
from transferlab.validate import (
    ResumePlan,
    read_json,
    check_command_line,
    check_config,
    checkpoint_path,
    resume_overrides,
    resume_plan_before_hydra,
)

log = logging.getLogger("transferlab")


# Sweep job folders are named after their overrides (conf/hydra/default.yaml).
def job_dirname(overrides: str, limit: int = 120) -> str:
    """`a=1,b=2` as one folder name: no path separators, cut at a whole override."""
    text = str(overrides).replace("/", "_").replace("\\", "_")
    if len(text) <= limit:
        return text or "default"
    kept = text[:limit].rsplit(",", 1)[0]
    return kept + ",..."


OmegaConf.register_new_resolver("tl_dirname", job_dirname, replace=True)


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
    plan = check_config(cfg, output_dir)
    if plan is not None and plan.nothing_to_do:
        log.info("%s", plan.describe())
        return plan.previous_metrics().get(_optimized_metric(cfg))
    # verbose=False: Lightning would print the seed on stderr, where only errors belong.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed: %s", cfg.seed)

    # First of the components: a bad trainer setting (precision=fp7) fails before any data is read.
    trainer = build_trainer(cfg, output_dir)
    clock = TrainingClock()
    trainer.callbacks.append(clock)
    backbone = build_backbone(cfg)
    datamodule = build_datamodule(cfg, backbone, output_dir)
    head = hydra.utils.instantiate(cfg.head, in_features=backbone.out_features, num_classes=datamodule.num_classes)
    model = TransferModule(
        backbone,
        head,
        num_classes=datamodule.num_classes,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        backbone_lr_ratio=cfg.mode.get("backbone_lr_ratio", 1.0),
        layer_decay=cfg.mode.get("layer_decay"),
        data_info=datamodule.describe(),
        channels_last=cfg.model.channels_last,
        compile=cfg.model.get("compile", False),
    )
    features_time = 0.0
    if should_cache(cfg.data.get("cache_features", "auto"), cfg.mode.name, cfg.data.augment, _train_bn(cfg)):
        started = time.perf_counter()
        cache_features(model, datamodule, device=_feature_device(cfg))
        features_time = time.perf_counter() - started
    log_hyperparameters(trainer, cfg)

    if plan is None or plan.trains:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, output_dir))
        metrics = {k: _number(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        if cfg.get("test", True):
            metrics.update(test_best(trainer, model, datamodule))
        metrics.update(epochs=trainer.current_epoch, train_time_s=round(_whole_train_time(clock, plan), 3))
    else:
        # A finished run resumed to be tested (e.g. the chosen trial of a search): nothing to train.
        metrics = test_without_training(trainer, model, datamodule, plan)
    metrics.update(
        # Computing (or loading) cached backbone features happens before fit: count it apart.
        features_time_s=round(features_time, 3),
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if trainer.is_global_zero:
        write_results(cfg, output_dir, metrics, plan)
    return metrics.get(_optimized_metric(cfg))


def write_results(cfg: DictConfig, output_dir: Path, metrics: dict, plan: ResumePlan | None) -> None:
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (output_dir / "run_info.json").write_text(json.dumps(run_record(cfg, output_dir, plan), indent=2) + "\n")
    log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    log.info("outputs in %s", output_dir)


def run_record(cfg: DictConfig, output_dir: Path, plan: ResumePlan | None) -> dict:
    """run_info.json: how the run began, and one entry per resume (a longer budget is recorded there)."""
    info = run_info(cfg)
    if plan is None:
        return info
    record = read_json(output_dir / "run_info.json") or info
    record.setdefault("resumes", []).append({
        "ckpt_path": str(plan.checkpoint),
        "from_epoch": plan.epochs_done,
        "max_epochs": plan.max_epochs,
        # the run now trains longer than it was started with: its numbers are the longer run's
        "longer_budget": plan.budget_raised,
        "tested_only": not plan.trains,
        "git_commit": info["git_commit"],
        "git_dirty": info["git_dirty"],
        "versions": info["versions"],
    })
    return record


def test_without_training(trainer: L.Trainer, model: TransferModule, datamodule, plan: ResumePlan) -> dict:
    """Test the best checkpoint of a run with no epoch left to train; its training metrics stay."""
    metrics = {k: v for k, v in plan.previous_metrics().items() if not k.startswith("test/")}
    if plan.test:
        best = best_checkpoint(plan.checkpoint) or plan.checkpoint
        results = trainer.test(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)
        metrics.update({k: _number(v) for k, v in (results[0] if results else {}).items()})
        # the best checkpoint holds the best validation accuracy (a killed run has no metrics.json)
        metrics.setdefault("val/acc_best", _number(model.val_acc_best.compute()))
    metrics.setdefault("epochs", plan.epochs_done)
    metrics.setdefault("train_time_s", round(_checkpoint_train_time(plan.checkpoint), 3))
    return metrics


def best_checkpoint(last: Path) -> Path | None:
    """The best checkpoint by val/acc that `last` records (ModelCheckpoint's state), if it is still there."""
    checkpoint = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_path"):
            path = Path(state["best_model_path"])
            if path.is_file():
                return path
    return None


def _checkpoint_train_time(path: Path) -> float:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return float(((checkpoint.get("callbacks") or {}).get("TrainingClock") or {}).get("train_time_s", 0.0))


def _whole_train_time(clock: TrainingClock, plan: ResumePlan | None) -> float:
    """Training time of the whole run: a finished run resumed for a longer budget adds this part to
    its metrics.json time (its checkpoint's clock stopped at the last save, before the run ended)."""
    previous = plan.previous_metrics().get("train_time_s") if plan is not None else None
    return clock.elapsed() + previous if previous is not None else clock.total()


def _optimized_metric(cfg: DictConfig) -> str:
    return cfg.get("optimized_metric") or "val/acc_best"


def build_backbone(cfg: DictConfig):
    """The configured backbone; `mode.pretrained=false` (scratch) means random init, whatever the weights say."""
    weights = cfg.backbone.get("weights")
    if not cfg.mode.get("pretrained", True):
        weights = "none"
    return hydra.utils.instantiate(cfg.backbone, image_size=cfg.data.image_size, weights=weights)


def build_datamodule(cfg: DictConfig, backbone, output_dir: Path):
    datamodule = hydra.utils.instantiate(cfg.data, output_dir=str(output_dir), weights=describe_weights(backbone))
    # Read and check the data now: bad input must fail before the trainer starts.
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    from transferlab.checkpointing import AtomicCheckpointIO

    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    if cfg.mode.get("callback"):
        # First: a param group added at unfreeze must exist before LearningRateMonitor logs the epoch.
        callbacks.insert(0, hydra.utils.instantiate(cfg.mode.callback))
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c] if cfg.get("logger") else False
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])


def log_hyperparameters(trainer: L.Trainer, cfg: DictConfig) -> None:
    """The run's settings, for TensorBoard's HParams tab (and the other loggers).

    The HParams tab reads each metric from the scalar of the same tag that the run logs
    later (`val/acc_best` during training, `test/*` at the end), so only the tag names are
    declared here: logging placeholder values would draw false points at step 0.
    """
    params = {k: v for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items() if _comparable(k)}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _declare_hparams(logger, params, metric_tags=("val/acc_best", "test/acc", "test/loss"))
        else:
            logger.log_hyperparams(params)


def _comparable(key: str) -> bool:
    """Settings worth a column when comparing runs: not paths, targets or bookkeeping."""
    leaf = key.rsplit(".", 1)[-1]
    return not (
        key.startswith(("paths.", "callbacks.", "logger.", "hydra."))
        or leaf in ("_target_", "_partial_", "root", "default_root_dir", "output_dir")
    )


@rank_zero_only  # other DDP ranks have no event file to write to
def _declare_hparams(logger: TensorBoardLogger, params: dict[str, Any], metric_tags) -> None:
    from torch.utils.tensorboard.summary import hparams

    experiment, session_start, session_end = hparams(params, {tag: 0.0 for tag in metric_tags})
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    writer.flush()
    logger.log_hyperparams(params)  # also keeps hparams.yaml next to the events


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    path = checkpoint_path(ckpt_path, output_dir)
    return None if path is None else str(path)


def test_best(trainer: L.Trainer, model: TransferModule, datamodule) -> dict[str, float]:
    """Test metrics from the best checkpoint by val/acc (the current weights if there is none)."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    return {k: _number(v) for k, v in (results[0] if results else {}).items()}


def _train_bn(cfg: DictConfig) -> bool:
    return bool(cfg.mode.get("train_bn", False))


def _feature_device(cfg: DictConfig) -> str:
    """Extract cached features where training will run: the GPU when there is one."""
    wants_gpu = str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _number(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    value = tree if isinstance(tree, (int, float, str, bool)) or tree is None else str(tree)
    return {prefix[:-1]: "null" if value is None else value}
