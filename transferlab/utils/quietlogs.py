"""A run's console shows what the user can act on: not other packages' tips and deprecations.

Dropped in a run (`quiet_third_party`, called by `transferlab.train.run`):
- Lightning's advertisement for litlogger, and its note that `limit_*_batches=1.0` uses 100% of
  the batches (our trainer config always passes 1.0: that is the default, not news);
- Lightning's warning that an epoch has fewer batches than `log_every_n_steps`: every metric of a
  run is logged once per epoch (`on_step=False`, the learning-rate monitor per epoch), so the
  interval does not decide anything;
- DeprecationWarning / FutureWarning raised inside the libraries we build on (e.g. torch's
  `isinstance(treespec, LeafSpec)` note that Lightning triggers): they are for those libraries'
  developers, a user of transferlab can do nothing about them.

`TRANSFERLAB_DEBUG=1` keeps everything, for whoever upgrades those libraries.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

#: Lightning's info lines that say nothing about this run
NOISE_LINES = re.compile(
    r"💡 Tip: |`Trainer\(limit_\w+_batches=1\.0\)` was configured so 100% of the batches"
)
#: loggers Lightning's rank_zero_info writes through
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: packages whose own deprecation notes are not the user's business
THIRD_PARTY = r"(lightning|lightning_fabric|pytorch_lightning|torch|torchvision|torchmetrics|timm|hydra|omegaconf|tensorboard|matplotlib)(\..*)?$"
LOGGING_INTERVAL_WARNING = r"The number of training batches \(\d+\) is smaller than the logging interval"
#: on every resume: the checkpoints are the run's own (a fresh run into a folder that holds some is
#: refused before Lightning starts: store.rundir.RunDir.check_writable)
CHECKPOINT_DIR_WARNING = r"Checkpoint directory .* exists and is not empty"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE_LINES.match(record.getMessage())


def quiet_third_party() -> None:
    """Install the filters above (once; a sweep calls this for every job)."""
    if os.environ.get("TRANSFERLAB_DEBUG"):
        return
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    warnings.filterwarnings("ignore", message=LOGGING_INTERVAL_WARNING)
    warnings.filterwarnings("ignore", message=CHECKPOINT_DIR_WARNING)


def route_lightning_logs_through_root() -> None:
    """Send Lightning's info lines where ours go (stdout and the run's train.log), not to stderr.

    Lightning gives its loggers a stderr handler of their own when it is imported before
    logging is configured, which is always the case under Hydra. Routed through the root
    logger they are kept in train.log, and stderr is left to warnings and the one-line errors.
    """
    if not logging.getLogger().handlers:
        return  # logging not configured (a library call): Lightning's own handler is all there is
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # not its subclass FileHandler
                logger.removeHandler(handler)
        logger.propagate = True
