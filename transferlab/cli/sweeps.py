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
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transferlab.store.rundir import RunDir
from transferlab.utils.errors import first_line, user_error_behind, user_errors_as_one_line
from transferlab.utils.numbers import readable

log = logging.getLogger("transferlab")

#: the sweep dir of the sweep that this process started last (set by SweepSummary)
_last_sweep: dict[str, Path] = {}


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def job_failures_handled() -> Iterator[None]:
    """Around one job of a command under Hydra: alone, a refusal is one line (also a UserError that
    hydra.utils.instantiate wrapped); in a sweep, a failure is recorded in the job's folder instead
    of ending the sweep, and the job returns None (the block's exception is swallowed).

    None, not NaN: optuna 2.10 refuses to be told NaN and the hydra-optuna-sweeper then crashes,
    while a value that is no number is recorded as a failed trial (with `max_failure_rate: 1.0`,
    conf/hparams_search/*, the study goes on).
    """
    if not in_sweep():
        with user_errors_as_one_line():
            yield
        return
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    RunDir(job_dir).failed.unlink(missing_ok=True)  # a job run again in its folder starts clean
    try:
        yield
    except Exception as error:
        cause = user_error_behind(error)
        if cause is None:  # a bug or the machine: keep the traceback in the job's log
            log.exception("job failed")
            message, exit_code = f"{type(error).__name__}: {first_line(error)}", 1
        else:
            message, exit_code = " ".join(str(cause).split()), cause.exit_code
        log.error("transferlab: error: %s", message)  # the job's log (train.log in its folder)
        record = {
            "error": message,
            "exit_code": exit_code,
            "overrides": list(HydraConfig.get().overrides.task),
        }
        RunDir(job_dir).failed.write_text(json.dumps(record, indent=2) + "\n")


class SweepSummary(Callback):
    """Note the sweep dir when a sweep starts, so that the command can read its jobs' folders at the
    end (also jobs that ran in other processes, e.g. under the submitit launcher, and also when
    the sweeper itself gave up, as Optuna's does when every trial failed)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _last_sweep["dir"] = Path(str(config.hydra.sweep.dir))
        # Before any job folder is named: the command's sweep, with its comma lists and ranges intact.
        _varying["keys"] = varying_keys(config.hydra)


def exit_if_jobs_failed() -> None:
    """After `-m`: one line on stderr and exit code 1 when any job of the sweep failed."""
    sweep_dir = _last_sweep.pop("dir", None)
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    jobs = [d for d in sorted(sweep_dir.iterdir()) if (d / ".hydra").is_dir()]
    failed = [str(d) for d in jobs if RunDir(d).failed.is_file()]
    if failed:
        print(
            f"transferlab: error: {len(failed)} of {len(jobs)} jobs failed: {', '.join(failed)} (see failed.json in each)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


# ---- job folder names ---------------------------------------------------------------------
# A sweep's job folder is named after what tells it apart: the keys that vary across the sweep
# (conf/hydra/default.yaml, `subdir: ${tl_job_dir:${hydra.job.num}}`), e.g. `3_mode=frozen,seed=1`.
# Settings every job shares would make long names that say nothing (and cut off what varies).

#: the most characters of overrides in a folder name (the job number keeps names unique)
NAME_LIMIT = 140
#: characters kept in a folder name; any other becomes `_`
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")
#: the keys that vary in the sweep this process started last (set by SweepSummary)
_varying: dict[str, list[str]] = {}


def varying_keys(hydra_cfg: DictConfig) -> list[str]:
    """Keys a sweep gives several values: sweep overrides on its command line (`a=1,2`,
    `range(..)`, `choice(..)`, `interval(..)`, `glob(..)`) and the sweeper's own search space
    (`hydra.sweeper.params`, e.g. an Optuna search's learning rate and weight decay)."""
    parser = OverridesParser.create()
    arguments = [str(o) for o in hydra_cfg.overrides.task]
    params = hydra_cfg.sweeper.get("params") if "sweeper" in hydra_cfg else None
    arguments += [f"{key}={value}" for key, value in (params or {}).items()]
    keys: list[str] = []
    for override in parser.parse_overrides(arguments):
        if override.is_sweep_override() and override.key_or_group not in keys:
            keys.append(override.key_or_group)
    return keys


def job_dir(num, _root_: DictConfig) -> str:
    """`<num>_<varying key>=<value>,...`: short, unique (the job number) and safe as a folder name."""
    hydra_cfg = _root_.hydra
    keys = _varying.get("keys")
    if keys is None:  # a job run in another process (a submitit launcher): ask the sweep's own record
        keys = _keys_recorded_in(Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml")
    if keys is None:
        keys = varying_keys(hydra_cfg)  # at least the sweeper's search space
    values = _job_values(hydra_cfg.overrides.task)
    name = job_dirname({k: values[k] for k in keys if k in values})
    return f"{num}_{name}" if name else str(num)


def job_dirname(settings: dict[str, str], limit: int = NAME_LIMIT) -> str:
    """`per_class=10,seed=1` from `{"data.fewshot.per_class": "10", "seed": "1"}`: keys shortened
    where that stays unambiguous, long floats to 4 digits, cut at a whole setting past `limit`."""
    names = _short_keys(list(settings))
    parts = [UNSAFE.sub("_", f"{names[k]}={readable(v)}") for k, v in settings.items()]
    text = ",".join(parts)
    if len(text) <= limit:
        return text
    kept = text[:limit].rsplit(",", 1)[0]
    return kept + ",..."


def _short_keys(keys: list[str]) -> dict[str, str]:
    """`data.fewshot.per_class` -> `per_class`, `backbone.name` -> `backbone`, unless two keys would meet."""

    def short(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    shorts = [short(k) for k in keys]
    return {k: s if shorts.count(s) == 1 else k for k, s in zip(keys, shorts)}


def _job_values(task) -> dict[str, str]:
    values = {}
    for entry in map(str, task):
        key, sep, value = entry.partition("=")
        if sep:
            values[key.lstrip("+~")] = value
    return values


def _keys_recorded_in(multirun_yaml: Path) -> list[str] | None:
    if not multirun_yaml.is_file():
        return None
    try:
        return varying_keys(OmegaConf.load(multirun_yaml).hydra)
    except Exception:  # an unreadable record: fall back to what the job's own config says
        return None


OmegaConf.register_new_resolver("tl_job_dir", job_dir, replace=True)
