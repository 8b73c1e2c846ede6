"""Sweeps (`-m`) that survive their jobs.

Hydra stops a whole sweep at the first job that raises (and our one-line errors exit the
process). Here a failed job is recorded in its own folder (`failed.json`, and the message
in the job's log), returns no value (the Optuna sweeper then records the trial as failed
and the study goes on), and the other jobs run. When the sweep ends, the command counts
the failed folders in the sweep dir (noted by `SweepSummary`, a Hydra callback in
conf/hydra/default.yaml), prints one summary line and exits non-zero (`exit_if_jobs_failed`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import first_line, user_error_behind

log = logging.getLogger("transferlab")

FAILED = "failed.json"
#: the sweep dir of the sweep that this process started last (set by SweepSummary)
_last_sweep: dict[str, Path] = {}


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_sweep_job(job: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """Run one job of a sweep; a failure is recorded in the job's folder instead of ending the sweep.

    A failed job returns None, not NaN: optuna 2.10 refuses to be told NaN and the
    hydra-optuna-sweeper then crashes, while a value that is no number is recorded as a
    failed trial (with `max_failure_rate: 1.0`, conf/hparams_search/*, the study goes on).
    """
    from hydra.core.hydra_config import HydraConfig

    job_dir = Path(HydraConfig.get().runtime.output_dir)
    (job_dir / FAILED).unlink(missing_ok=True)  # a job run again in its folder starts clean
    try:
        return job(cfg)
    except Exception as error:
        cause = user_error_behind(error)
        if cause is None:  # a bug or the machine: keep the traceback in the job's log
            log.exception("job failed")
            message, exit_code = f"{type(error).__name__}: {first_line(error)}", 1
        else:
            message, exit_code = " ".join(str(cause).split()), cause.exit_code
        log.error("transferlab: error: %s", message)  # the job's log (train.log in its folder)
        record = {"error": message, "exit_code": exit_code, "overrides": list(HydraConfig.get().overrides.task)}
        (job_dir / FAILED).write_text(json.dumps(record, indent=2) + "\n")
        return None


class SweepSummary(Callback):
    """Note the sweep dir when a sweep starts, so that the command can read its jobs' folders at the
    end (also jobs that ran in other processes, e.g. under the submitit launcher, and also when
    the sweeper itself gave up, as Optuna's does when every trial failed)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _last_sweep["dir"] = Path(str(config.hydra.sweep.dir))


def exit_if_jobs_failed() -> None:
    """After `-m`: one line on stderr and exit code 1 when any job of the sweep failed."""
    sweep_dir = _last_sweep.pop("dir", None)
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    jobs = [d for d in sorted(sweep_dir.iterdir()) if (d / ".hydra").is_dir()]
    failed = [str(d) for d in jobs if (d / FAILED).is_file()]
    if failed:
        print(f"transferlab: error: {len(failed)} of {len(jobs)} jobs failed: {', '.join(failed)} (see failed.json in each)",
              file=sys.stderr, flush=True)
        sys.exit(1)


# Sweep job folders are named after their overrides (conf/hydra/default.yaml).
# Sweep job folders are named after their overrides (conf/hydra/default.yaml).
def job_dirname(overrides: str, limit: int = 120) -> str:
    """`a=1,b=2` as one folder name: no path separators, cut at a whole override."""
    text = str(overrides).replace("/", "_").replace("\\", "_")
    if len(text) <= limit:
        return text or "default"
    kept = text[:limit].rsplit(",", 1)[0]
    return kept + ",..."


OmegaConf.register_new_resolver("tl_dirname", job_dirname, replace=True)
