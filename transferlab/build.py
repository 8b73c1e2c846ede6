"""One assembler: a composed config -> data module, model and trainer.

`python -m transferlab`, the tests and the benchmarks all build through `build(cfg)`, so
rules such as "scratch means random init" or "a frozen backbone without augmentation trains
on cached features" hold everywhere, not only in the training script. The order follows
what depends on what: the trainer first (a bad trainer setting fails before any data is
read), the backbone (its weights decide the default normalization), the data (its classes
decide the head), the model, and last the cached features (the one expensive step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from transferlab.data.datamodule import TensorImageDataModule
from transferlab.features import should_cache
from transferlab.inference import architecture_record
from transferlab.linear_probe import check_probe_config
from transferlab.regularizers import build_regularizer, check_regularizer_config
from transferlab.models import TransferModule
from transferlab.normalization import describe_weights


@dataclass
class Assembly:
    datamodule: TensorImageDataModule
    model: TransferModule
    trainer: L.Trainer | None
    features_time_s: float = 0.0  # computing or loading cached backbone features, before fit


def build(cfg: DictConfig, output_dir: Path | None = None, with_trainer: bool = True) -> Assembly:
    """Everything a run needs, checked and ready; `with_trainer=False` for benchmarks and tools."""
    check_method_combination(cfg)
    trainer = build_trainer(cfg, output_dir) if with_trainer else None
    backbone = build_backbone(cfg)
    datamodule = build_datamodule(cfg, backbone, output_dir)
    model = build_model(cfg, backbone, datamodule)
    features_time = 0.0
    if uses_cached_features(cfg):
        features_time = datamodule.use_features(model.backbone, device=feature_device(cfg))
        model.inputs_are_features = True
    return Assembly(datamodule, model, trainer, features_time)


def build_backbone(cfg: DictConfig):
    """The configured backbone, with the weights `backbone_weights` says it starts from."""
    return hydra.utils.instantiate(cfg.backbone, image_size=cfg.data.image_size, weights=backbone_weights(cfg.backbone, cfg.mode))


def backbone_weights(backbone: Mapping, mode: Mapping):
    """The weights a run starts from: `mode.pretrained=false` (scratch) means random init, whatever
    `backbone.weights` says (the one home of that rule: building, and the HParams the run reports)."""
    return backbone.get("weights") if mode.get("pretrained", True) else "none"


def build_datamodule(cfg: DictConfig, backbone, output_dir: Path | None) -> TensorImageDataModule:
    # The weights' own preprocessing: the data module's normalization follows it unless the
    # config says otherwise (transferlab.normalization, the one rule).
    datamodule = hydra.utils.instantiate(
        cfg.data, output_dir=str(output_dir) if output_dir else None, weights=describe_weights(backbone)
    )
    # Read and check the data now: bad input must fail before the trainer starts.
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_model(cfg: DictConfig, backbone, datamodule: TensorImageDataModule) -> TransferModule:
    """The LightningModule of `conf/model/`: backbone, a new head for the data's classes, optimizer, scheduler."""
    head = hydra.utils.instantiate(cfg.head, in_features=backbone.out_features, num_classes=datamodule.num_classes)
    model = hydra.utils.instantiate(
        cfg.model,
        backbone=backbone,
        head=head,
        num_classes=datamodule.num_classes,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        data_info=datamodule.describe(),
        # After the backbone's weights are loaded: L2-SP snapshots them as its w0 (TransferModule binds it).
        regularizer=build_regularizer(cfg),
    )
    # Set after instantiate: Hydra would build the `_target_` nodes it holds. Checkpoints record it, so
    # that `TransferModule.load_from_checkpoint(path)` rebuilds this network without the config.
    model.architecture = architecture_record(cfg, backbone, datamodule.num_classes)
    return model


def check_method_combination(cfg: DictConfig) -> None:
    """Mode x head x regularizer combinations that would mean nothing, refused before any weights or data."""
    check_probe_config(cfg)
    check_regularizer_config(cfg)


def build_trainer(cfg: DictConfig, output_dir: Path | None) -> L.Trainer:
    from transferlab.callbacks.guards import TrainingClock
    from transferlab.checkpointing import AtomicCheckpointIO

    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    if cfg.mode.get("callback"):
        # First: what trains in an epoch (and the rates of frozen groups) is settled before
        # LearningRateMonitor logs the epoch.
        callbacks.insert(0, hydra.utils.instantiate(cfg.mode.callback))
    callbacks.append(TrainingClock())  # train_time_s of the whole run, across resumes
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c] if cfg.get("logger") else False
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])


def uses_cached_features(cfg: DictConfig) -> bool:
    return should_cache(cfg.data.get("cache_features", "auto"), cfg.mode.name, cfg.data.augment, bool(cfg.mode.get("train_bn", False)))


def feature_device(cfg: DictConfig) -> str:
    """Extract cached features where training will run: the GPU when there is one."""
    wants_gpu = str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"
