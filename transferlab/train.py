"""`python -m transferlab`: compose the config, build data + model + trainer, fit, test.

The configs (`conf/`) do the composing; this file only instantiates what they describe,
in the order the pieces depend on each other: backbone (its weights decide the default
normalization) -> data (its classes decide the head) -> head -> module -> trainer.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import UserError, exit_with
from transferlab.features import cache_features, should_cache
from transferlab.models import TransferModule
from transferlab.runinfo import check_output_dir, config_dir, run_info

log = logging.getLogger("transferlab")

# Sweep job folders are named after their overrides; a path value must not nest folders.
OmegaConf.register_new_resolver(
    "tl_dirname", lambda text: str(text).replace("/", "_").replace("\\", "_")[:150] or "default", replace=True
)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except UserError as error:
        exit_with(error)
    finally:
        release_memory()  # sweeps run many jobs in one process


def run(cfg: DictConfig) -> float | None:
    output_dir = Path(cfg.paths.output_dir)
    check_output_dir(output_dir, resuming=cfg.ckpt_path is not None)
    L.seed_everything(cfg.seed, workers=True)

    backbone = hydra.utils.instantiate(cfg.backbone, image_size=cfg.data.image_size)
    datamodule = build_datamodule(cfg, backbone, output_dir)
    head = hydra.utils.instantiate(cfg.head, in_features=backbone.out_features, num_classes=datamodule.num_classes)
    model = TransferModule(
        backbone,
        head,
        num_classes=datamodule.num_classes,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        backbone_lr_ratio=cfg.mode.get("backbone_lr_ratio", 1.0),
        data_info=datamodule.describe(),
        channels_last=cfg.model.channels_last,
        compile=cfg.model.get("compile", False),
    )
    if should_cache(cfg.data.get("cache_features", "auto"), cfg.mode.name, cfg.data.augment, _train_bn(cfg)):
        cache_features(model, datamodule, device=_feature_device(cfg))
    trainer = build_trainer(cfg, output_dir)
    log_hyperparameters(trainer, cfg)

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, output_dir))
    train_time = time.perf_counter() - started

    metrics = {k: _number(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    if cfg.get("test", True):
        metrics.update(test_best(trainer, model, datamodule))
    metrics.update(
        epochs=trainer.current_epoch,
        train_time_s=round(train_time, 3),
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (output_dir / "run_info.json").write_text(json.dumps(run_info(cfg), indent=2) + "\n")
        log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
        log.info("outputs in %s", output_dir)
    return metrics.get(cfg.get("optimized_metric") or "val/acc_best")


def build_datamodule(cfg: DictConfig, backbone, output_dir: Path):
    normalization = resolve_normalization(cfg.data.get("normalization"), backbone)
    datamodule = hydra.utils.instantiate(cfg.data, output_dir=str(output_dir), **normalization)
    # Read and check the data now: bad input must fail before the trainer starts.
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def resolve_normalization(requested: str | None, backbone) -> dict[str, Any]:
    """Normalization follows the weights unless the config sets it; a mismatch gets a warning."""
    from_weights = getattr(backbone, "normalization", None)
    if requested is None:
        if from_weights is None:
            return {"normalization": "cifar"}  # random init: the dataset's own statistics
        if from_weights.get("name") == "imagenet":
            return {"normalization": "imagenet"}
        return {"normalization": from_weights.get("name"), "mean": from_weights["mean"], "std": from_weights["std"]}
    if from_weights is not None and from_weights.get("name") not in (None, requested):
        warnings.warn(
            f"data.normalization={requested} but the backbone weights ({backbone.weights_source}) were trained "
            f"with {from_weights.get('name')} normalization; leave data.normalization unset to follow the weights",
            stacklevel=2,
        )
    return {"normalization": requested}


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    from transferlab.checkpointing import AtomicCheckpointIO

    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    if cfg.mode.get("callback"):
        callbacks.append(hydra.utils.instantiate(cfg.mode.callback))
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c] if cfg.get("logger") else False
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])


def log_hyperparameters(trainer: L.Trainer, cfg: DictConfig) -> None:
    """Flat hyperparameters + the metrics the HParams tab compares runs by."""
    params = _flatten(OmegaConf.to_container(cfg, resolve=True))
    params = {k: v for k, v in params.items() if not k.startswith(("paths.", "callbacks.", "logger."))}
    initial = {"val/acc_best": 0.0, "test/acc": 0.0, "test/loss": 0.0}
    for logger in trainer.loggers:
        logger.log_hyperparams(params, **({"metrics": initial} if _takes_metrics(logger) else {}))


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise UserError(f"ckpt_path=last but {last} does not exist; resume in the run dir of the interrupted run (hydra.run.dir=...)")
        return str(last)
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(ckpt_path)


def test_best(trainer: L.Trainer, model: TransferModule, datamodule) -> dict[str, float]:
    """Test metrics from the best checkpoint by val/acc (the current weights if there is none)."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    return {k: _number(v) for k, v in (results[0] if results else {}).items()}


def _train_bn(cfg: DictConfig) -> bool:
    callback = cfg.mode.get("callback") or {}
    return bool(callback.get("train_bn", False))


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


def _takes_metrics(logger) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)
