"""One assembler: a composed config -> checked, then data module, model and trainer.

`python -m transferlab`, the tests, the benchmarks and the ranking all go through `check_config`
and `build(cfg)`, so rules such as "scratch means random init" or "a frozen backbone without
augmentation trains on cached features" hold everywhere, not only in the training script.

`check_config` is the one check list: the config's own checks first, then each owner once,
given its slice of the config, cheapest first. `build` then asks each owner to construct its
part, in the order of what depends on what: the trainer with the mode's callback (a bad
trainer setting fails before any data is read), the backbone (its weights decide the default
normalization), the data (its classes decide the head), the model, and last the cached
features (the one expensive step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from transferlab.callbacks.guards import AtomicCheckpointIO, FrozenBackboneSavedOnce, TrainingClock
from transferlab.data.datamodule import TensorImageDataModule, check_data_root
from transferlab.data.features import feature_device, feature_splits
from transferlab.data.normalization import describe_weights
from transferlab.methods.mode_facts import Mode, mode_facts
from transferlab.methods.regularizers import build_regularizer
from transferlab.models import TransferModule
from transferlab.models.architecture import architecture_record
from transferlab.run.checks import check_settings
from transferlab.run.precision import AUTO, resolve_precision, why_resolved
from transferlab.run.resume import ResumePlan, check_resume
from transferlab.run.robustness import check_eval_fits
from transferlab.store.rundir import RunDir, resumes

log = logging.getLogger("transferlab")


# ---- the one check list --------------------------------------------------------------------
def check_config(cfg: DictConfig, output_dir: Path) -> ResumePlan | None:
    """Every check on the composed config, before anything is built; for a resume, what is left to do.

    The checks of the config alone first (`run.checks.check_settings`: the config's own, then each
    owner once with its slice; transferlab.cli ran them before the job too), then the data root, the
    resume (it reads the checkpoint) and the run dir.
    """
    check_settings(cfg)
    check_data_root(cfg.data)
    # After the mode's: a probe has nothing to resume, which says more than a missing last.ckpt.
    plan = check_resume(cfg, output_dir)
    RunDir(output_dir).check_writable(resuming=resumes(cfg.get("ckpt_path")))
    return plan


# ---- building --------------------------------------------------------------------------------
@dataclass
class Assembly:
    datamodule: TensorImageDataModule
    model: TransferModule
    trainer: L.Trainer | None
    mode: Mode  # what the mode is (methods.modes: its facts)
    feature_device: str  # where backbone features are computed (resolved once, from trainer.accelerator)
    features_time_s: float = 0.0  # computing or loading cached backbone features, before fit


def build(cfg: DictConfig, output_dir: Path | None = None, with_trainer: bool = True) -> Assembly:
    """Everything a run needs, ready; `with_trainer=False` for benchmarks and tools."""
    trainer = build_trainer(cfg, output_dir) if with_trainer else None
    backbone = build_backbone(cfg)
    mode = mode_facts(cfg.mode)
    cached = mode.caches_features(cfg.data.get("cache_features", "auto"), bool(cfg.data.augment))
    datamodule = build_datamodule(cfg, backbone, output_dir)
    model = build_model(cfg, backbone, datamodule)
    built = Assembly(datamodule, model, trainer, mode, feature_device(cfg.trainer.get("accelerator")))
    if cached:
        started = time.perf_counter()
        precision = str(trainer.precision) if trainer is not None else "32-true"  # the fit's arithmetic
        datamodule.serve_features(
            feature_splits(model.backbone, datamodule, built.feature_device, precision=precision)
        )
        built.features_time_s = time.perf_counter() - started
        model.inputs_are_features = True
    return built


def build_backbone(cfg: DictConfig):
    """The configured backbone, with the weights it starts from (the mode's `starting_weights`)."""
    weights = mode_facts(cfg.mode).starting_weights(cfg.backbone.get("weights"))
    return hydra.utils.instantiate(cfg.backbone, image_size=cfg.data.image_size, weights=weights)


def build_datamodule(cfg: DictConfig, backbone, output_dir: Path | None) -> TensorImageDataModule:
    # The weights' own preprocessing: the data module's normalization follows it unless the
    # config says otherwise (data.normalization, the one rule).
    datamodule = hydra.utils.instantiate(
        cfg.data, output_dir=str(output_dir) if output_dir else None, weights=describe_weights(backbone)
    )
    # Read and check the data now: bad input must fail before the trainer starts.
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_eval_fits(cfg.get("eval"), datamodule)  # the test images it corrupts, before any feature or epoch
    return datamodule


def build_model(cfg: DictConfig, backbone, datamodule: TensorImageDataModule) -> TransferModule:
    """The LightningModule of `conf/model/`: backbone, a new head for the data's classes, optimizer, scheduler."""
    head = hydra.utils.instantiate(
        cfg.head, in_features=backbone.out_features, num_classes=datamodule.num_classes
    )
    model = hydra.utils.instantiate(
        cfg.model,
        backbone=backbone,
        head=head,
        num_classes=datamodule.num_classes,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        data_info=datamodule.describe(),
        # After the backbone's weights are loaded: L2-SP snapshots them as its w0 (TransferModule binds it).
        regularizer=build_regularizer(cfg.get("regularizer")),
    )
    # Set after instantiate: Hydra would build the `_target_` nodes it holds. Checkpoints record it, so
    # that `TransferModule.load_from_checkpoint(path)` rebuilds this network without the config.
    model.architecture = architecture_record(
        cfg.backbone, cfg.head, cfg.data.image_size, backbone, datamodule.num_classes
    )
    return model


def build_trainer(cfg: DictConfig, output_dir: Path | None) -> L.Trainer:
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    if cfg.mode.get("callback"):
        # First: what trains in an epoch (and the rates of frozen groups) is settled before
        # LearningRateMonitor logs the epoch.
        callbacks.insert(0, hydra.utils.instantiate(cfg.mode.callback))
    callbacks.append(TrainingClock())  # train_time_s of the whole run, across resumes
    callbacks.append(FrozenBackboneSavedOnce())  # a fit on cached features saves its backbone once
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c] if cfg.get("logger") else False
    precision = resolve_precision(cfg.trainer, cuda_available=torch.cuda.is_available)
    if (
        str(cfg.trainer.get("precision")) == AUTO
    ):  # resolved once, here; run_info.json and checkpoints record it
        log.info("trainer.precision=auto: %s (%s)", precision, why_resolved(precision))
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()], precision=precision
    )
