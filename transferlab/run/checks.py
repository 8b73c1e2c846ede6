"""Every check decided from the composed config alone: the config's own, then each owner once with
its slice, from the layers above to the ones below (the run's budget, the mode, the model's parts).

Light on purpose (torch at most, never Lightning): `transferlab.cli` runs this list before Hydra
starts a job, so a meaningless combination is refused in about the time `import torch` takes;
`build.check_config` runs it again inside the job, then the checks that read data, checkpoints
and the run dir.
"""

from __future__ import annotations

from omegaconf import DictConfig

from transferlab.config import check_config_itself
from transferlab.methods.mode_facts import Mode, check_mode
from transferlab.methods.probe import check_probe
from transferlab.methods.regularizers import check_regularizer
from transferlab.models.checks import check_components, check_label_smoothing, check_learning_rate_ratios
from transferlab.run.budget import check_training_budget
from transferlab.run.calibration import check_calibration
from transferlab.run.devices import check_devices
from transferlab.run.precision import check_precision, cuda_available_now
from transferlab.run.results import check_optimized_metric
from transferlab.run.robustness import check_eval


def check_settings(cfg: DictConfig) -> Mode:
    """Refuse, in one line (UserError), what the composed config says that cannot run as meant;
    returns the mode's facts."""
    check_config_itself(cfg)
    test = bool(cfg.get("test", True))
    check_training_budget(cfg.trainer, test=test)
    check_precision(cfg.trainer, cuda_available=cuda_available_now)
    check_devices(cfg.trainer)
    check_optimized_metric(cfg.get("optimized_metric"), test=test)
    check_calibration(cfg.get("calibration"), test=test)
    check_eval(cfg.get("eval"), test=test)
    weights = cfg.backbone.get("weights")
    mode = check_mode(cfg.mode, cfg.trainer.get("max_epochs"), weights)
    cached = mode.caches_features(cfg.data.get("cache_features", "auto"), bool(cfg.data.augment))
    check_probe(mode, cfg.mode, cfg.head.get("_target_", ""), cfg.get("ckpt_path"), cached, cfg.trainer)
    check_regularizer(
        cfg.get("regularizer"), mode, mode.starting_weights(weights), cfg.data.get("batch_size")
    )
    check_components(cfg.optimizer, cfg.get("scheduler"), cfg.head)
    check_learning_rate_ratios(cfg.model.backbone_lr_ratio, cfg.model.layer_decay)
    check_label_smoothing(cfg.model.get("label_smoothing", 0.0), solved_by=None if mode.fits else mode.name)
    return mode
