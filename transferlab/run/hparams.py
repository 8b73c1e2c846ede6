"""The run's settings for TensorBoard's HParams tab (and any other logger)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from transferlab.methods.mode_facts import mode_facts


def log_hyperparameters(trainer: L.Trainer, cfg: DictConfig) -> None:
    """The run's settings, for TensorBoard's HParams tab (and the other loggers).

    The HParams tab reads each metric from the scalar of the same tag that the run logs
    later (`val/acc_best` during training, `test/*` at the end), so only the tag names are
    declared here: logging placeholder values would draw false points at step 0.
    """
    settings = OmegaConf.to_container(cfg, resolve=True)
    params = {k: v for k, v in _flatten(settings).items() if _comparable(k)}
    params.update(component_names(settings))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _declare_hparams(
                logger, params, metric_tags=("val/acc_best", "test/acc", "test/loss", "test/ece")
            )
        else:
            logger.log_hyperparams(params)


#: config groups that name a class or function to build (`_target_`, dropped from the columns)
NAMED_COMPONENTS = ("backbone", "head", "optimizer", "scheduler")


def component_names(settings: dict) -> dict[str, str]:
    """`optimizer.name=AdamW`, `scheduler.name=CosineAnnealingLR` (or `none`), `head.name=mlp`,
    `backbone.name=cnn_small`: what each group builds, named after its `_target_` (whose full
    path is not a column), and `backbone.weights` as the run used them.
    """
    names = {}
    for group in NAMED_COMPONENTS:
        node = settings.get(group) or {}
        target = str(node.get("_target_") or "")
        # a group's own `name` (torchvision/timm backbones: the model) says more than its builder
        name = node.get("name") or target.rsplit(".", 1)[-1].removesuffix("_head") or "none"
        names[f"{group}.name"] = str(name)
    backbone = settings.get("backbone") or {}
    used = mode_facts(settings.get("mode") or {}).starting_weights(backbone.get("weights"))
    if used != backbone.get("weights"):  # mode=scratch: random init, whatever the config says
        names["backbone.weights"] = str(used)
    return names


def _comparable(key: str) -> bool:
    """Settings worth a column when comparing runs: not paths, targets or bookkeeping."""
    leaf = key.rsplit(".", 1)[-1]
    return not (
        key.startswith(("paths.", "callbacks.", "logger.", "hydra."))
        or leaf in ("_target_", "_partial_", "root", "default_root_dir", "output_dir")
    )


@rank_zero_only  # other DDP ranks have no event file to write to
def _declare_hparams(logger: TensorBoardLogger, params: dict[str, Any], metric_tags) -> None:
    from torch.utils.tensorboard.summary import (
        hparams,  # heavy: tensorboard internals, only when HParams are declared
    )

    experiment, session_start, session_end = hparams(params, {tag: 0.0 for tag in metric_tags})
    writer = _event_file_writer(logger)
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    writer.flush()
    logger.log_hyperparams(params)  # also keeps hparams.yaml next to the events


def _event_file_writer(logger: TensorBoardLogger):
    """The event file's writer behind TensorBoard's SummaryWriter.

    A private method of torch's SummaryWriter, fenced here: it is the call Lightning's own
    `TensorBoardLogger.log_hyperparams` makes to write the HParams summaries, and the only way to
    declare the metric tags without logging placeholder values (`add_hparams` would log them).
    """
    return logger.experiment._get_file_writer()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    value = tree if isinstance(tree, (int, float, str, bool)) or tree is None else str(tree)
    return {prefix[:-1]: "null" if value is None else value}
