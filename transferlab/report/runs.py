"""Finding runs on disk and reading what they wrote; jobs of a sweep that did not finish.

A run is a folder with metrics.json. A job that did not finish is a folder Hydra started
(it has `.hydra/`) without one: failed (it left an error record), killed, or still running.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf

from transferlab.run.precision import CANONICAL
from transferlab.store.rundir import read_json, read_yaml
from transferlab.utils.errors import UserError

#: how deep below a sweep dir run folders are looked for (job folders, or sweep/group/job)
SEARCH_DEPTH = 2
#: what a failed sweep job leaves in its folder (transferlab.cli.sweeps writes failed.json)
FAILED_RECORD, ERROR_TEXT = "failed.json", "error.txt"
#: the value shown for a setting a run does not have
MISSING = "-"
#: the value shown for a config node that was not overridden and has no `name` to show
AS_CONFIGURED = "(config)"


# ---- finished runs -----------------------------------------------------------------------
@dataclass
class Run:
    """One finished run as it lies on disk."""

    path: Path
    overrides: dict[str, str]
    config: Any  # the run's composed config (OmegaConf), None when .hydra/config.yaml is absent
    metrics: dict[str, float]
    name: str = ""  # short id for tables, set once all runs of a report are known
    fewshot_counts: dict[str, int] | None = field(default=None, repr=False)
    #: the config group choices Hydra recorded (`.hydra/hydra.yaml`): `{"data": "cifar10", "backbone": ...}`
    choices: dict[str, str] = field(default_factory=dict, repr=False)
    #: the weights the backbone started from, as loaded (run_info.json `backbone_weights`; "random init"
    #: for a mode that is not pretrained); None for an older run that recorded neither
    weights_loaded: str | None = field(default=None, repr=False)
    #: the corruption evaluation its test_c/* numbers come from (run_info.json `eval`), None without one
    evaluation: dict | None = field(default=None, repr=False)
    #: the precision it trained in, as resolved (run_info.json `precision`; trainer.precision=auto
    #: resolves per machine); else the config's value, None when neither says
    precision: str | None = field(default=None, repr=False)

    def component(self, group: str) -> str:
        """What a config group built: its `name` (a torchvision/timm backbone's model), else the
        group's choice (`backbone=cnn_small`, `data=cifar10`), else MISSING."""
        name = _config_value(self.config, f"{group}.name")
        if name not in (MISSING, "null"):
            return name
        return str(self.choices.get(group) or self.overrides.get(group) or MISSING)

    def setting(self, key: str) -> str:
        """The value of `key` in this run: its override, else what the config composed."""
        if key in self.overrides:
            return self.overrides[key]
        return _config_value(self.config, key)


def is_run(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run dirs (folders with metrics.json) among `paths` and up to two levels below each."""
    return find_jobs(paths)[0]


def find_jobs(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(finished run dirs, job dirs that did not finish) among `paths` and up to two levels below."""
    runs: list[Path] = []
    unfinished: list[Path] = []
    for path in map(Path, paths):
        for job in _jobs_in_argument(path):
            found = runs if is_run(job) else unfinished
            if job not in found:  # a run dir given alongside its sweep dir counts once
                found.append(job)
    return runs, unfinished


def _jobs_in_argument(path: Path) -> list[Path]:
    """The jobs under one command-line path; a path that holds none is the user's mistake."""
    if not path.exists():
        raise UserError(f"{path} does not exist; give a sweep dir or run dirs that hold metrics.json")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give a sweep dir or run dirs that hold metrics.json")
    jobs = _jobs_under(path.resolve(), SEARCH_DEPTH)
    if not jobs:
        raise UserError(
            f"no runs found in {path}: looked for metrics.json in it and in its subfolders "
            f"up to {SEARCH_DEPTH} levels down (a sweep's job folders, or a run dir)"
        )
    return jobs


def _jobs_under(folder: Path, depth: int) -> list[Path]:
    """Finished runs and started jobs: a folder that is either is not searched further."""
    if is_run(folder) or (folder / ".hydra").is_dir():
        return [folder]
    if depth == 0:
        return []
    jobs: list[Path] = []
    for child in sorted(
        (c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_natural_key
    ):
        jobs.extend(_jobs_under(child, depth - 1))
    return jobs


def _natural_key(path: Path) -> list:
    """Sort job folders 2, 10 (not 10, 2): Hydra numbers them in the order of the sweep."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class BrokenRun(UserError):
    """A run dir whose metrics.json cannot be trusted: the report lists it as failed, not as a row."""


#: metrics.json keys whose values a report shows: each must be a finite number when present
SHOWN_METRICS = (
    "val/acc_best",
    "test/acc",
    "test/ece",
    "test/ece_calibrated",
    "epochs",
    "train_time_s",
    "features_time_s",
    "params_trainable",
    "params_total",
)
#: a run's time in the tables: training plus computing its cached features (frozen mode), which
#: happens before training and is recorded apart in metrics.json (transferlab/train.py)
TIME, TIME_PARTS = "time_s", ("train_time_s", "features_time_s")


def load_run(path: Path) -> Run:
    """One finished run; BrokenRun when its metrics.json is unreadable or holds junk."""
    path = Path(path)
    overrides = read_overrides(path / ".hydra" / "overrides.yaml")
    config = _read_config(path / ".hydra" / "config.yaml")
    with_resumed_budget(overrides, config, _resumed_max_epochs(path / "run_info.json"))
    return Run(
        path=path,
        overrides=overrides,
        config=config,
        metrics=with_run_time(read_metrics(path / "metrics.json")),
        fewshot_counts=_read_fewshot_counts(path / "fewshot_indices.json"),
        choices=_read_choices(path / ".hydra" / "hydra.yaml"),
        weights_loaded=_weights_loaded(path / "run_info.json", config),
        evaluation=_evaluation(path / "run_info.json"),
        precision=_precision(path / "run_info.json", config),
    )


def _precision(run_info_file: Path, config) -> str | None:
    recorded = read_run_file(run_info_file).get("precision")
    if isinstance(recorded, str) and recorded:
        return recorded
    configured = _config_value(config, "trainer.precision")
    # an older run's explicit setting is what it trained in; `auto` before it was recorded is unknown
    return None if configured in (MISSING, "null", "auto") else CANONICAL.get(configured, configured)


def _evaluation(run_info_file: Path) -> dict | None:
    """The settings of the run's corruption evaluation (`run.robustness`); one that is not a mapping
    is a broken record (its test_c numbers could not be labelled)."""
    recorded = read_run_file(run_info_file).get("eval")
    if recorded is not None and not isinstance(recorded, dict):
        raise BrokenRun(
            f"{run_info_file}: its eval record is a {type(recorded).__name__}, not a mapping: remove the run or rerun it"
        )
    return recorded


def _weights_loaded(run_info_file: Path, config) -> str | None:
    """What the backbone started from, as the run recorded it; an older run's only where its config
    leaves no doubt (a mode that is not pretrained starts from random init, whatever backbone.weights says)."""
    recorded = read_run_file(run_info_file).get("backbone_weights")
    if isinstance(recorded, str) and recorded:
        return recorded
    pretrained = _config_value(config, "mode.pretrained")
    not_pretrained = pretrained == "false" or (
        pretrained == MISSING and _config_value(config, "mode.name") == "scratch"
    )
    # models.weights.NO_WEIGHTS, spelled here: the report reads runs without importing torch
    if not_pretrained or _config_value(config, "backbone.weights").lower() in (
        "none",
        "null",
        "false",
        "random",
        "",
    ):
        return "random init"
    return None


def _resumed_max_epochs(run_info_file: Path) -> int | None:
    """The trainer.max_epochs of the run's last resume (run_info.json `resumes`), None if never resumed.

    A resume may raise trainer.max_epochs, and Hydra's files in the run dir keep the first
    command's value: without this a run that trained 3 epochs would read max_epochs=2."""
    resumes = read_run_file(run_info_file).get("resumes") or []
    if not isinstance(resumes, list):
        raise BrokenRun(
            f"{run_info_file}: its resumes are a {type(resumes).__name__}, not a list: remove the run or rerun it"
        )
    budgets = [
        r.get("max_epochs") for r in resumes if isinstance(r, dict) and isinstance(r.get("max_epochs"), int)
    ]
    return budgets[-1] if budgets else None


def with_resumed_budget(overrides: dict[str, str], config, max_epochs: int | None) -> None:
    if max_epochs is None:
        return
    if "trainer.max_epochs" in overrides:
        overrides["trainer.max_epochs"] = str(max_epochs)
    if _config_value(config, "trainer.max_epochs") not in (MISSING, "null"):
        config.trainer.max_epochs = max_epochs


def with_run_time(metrics: dict[str, Any]) -> dict[str, Any]:
    """`time_s` = train_time_s + features_time_s (absent in runs that predate it: 0)."""
    if is_number(metrics.get("train_time_s")):
        metrics[TIME] = sum(metrics.get(part) or 0.0 for part in TIME_PARTS)
    return metrics


def read_metrics(metrics_file: Path) -> dict[str, Any]:
    """The metrics of a run, checked: a wrong number in a table is worse than a missing one."""
    fix = "remove the run or rerun it"
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError:
        raise BrokenRun(f"metrics.json is not valid JSON: {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BrokenRun(
            f"metrics.json cannot be read ({getattr(e, 'strerror', None) or type(e).__name__}): {fix}"
        ) from None
    if not isinstance(metrics, dict):
        raise BrokenRun(f"metrics.json holds a {type(metrics).__name__}, not a table of metrics: {fix}")
    junk = [
        f"{key}={metrics[key]!r}" for key in SHOWN_METRICS if key in metrics and not is_number(metrics[key])
    ]
    if junk:
        raise BrokenRun(f"metrics.json has {', '.join(junk)}, not finite numbers: {fix}")
    return metrics


def is_number(value) -> bool:
    """A metric value that can be shown and averaged: not missing, not a bool, not NaN or inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_runs(paths: Iterable[Path]) -> list[Run]:
    """Every finished run found under `paths`, with short names that tell them apart."""
    return named_runs(find_runs(paths))


def named_runs(run_dirs: list[Path]) -> list[Run]:
    if not run_dirs:
        raise UserError("no finished runs (no metrics.json) to compare")
    return name_runs([load_run(p) for p in run_dirs])


def load_finished(run_dirs: list[Path]) -> tuple[list[Run], list["UnfinishedJob"]]:
    """(runs, broken runs as failed jobs): one bad metrics.json does not hide the other runs."""
    runs, broken = [], []
    for path in run_dirs:
        try:
            runs.append(load_run(path))
        except BrokenRun as error:
            broken.append(
                UnfinishedJob(
                    path=Path(path),
                    overrides=read_overrides(Path(path) / ".hydra" / "overrides.yaml"),
                    error=str(error),
                )
            )
    return (name_runs(runs) if runs else runs), broken


def name_runs(runs: list[Run]) -> list[Run]:
    for run, name in zip(runs, short_names([r.path for r in runs])):
        run.name = name
    return runs


def short_names(paths: list[Path]) -> list[str]:
    """Job numbers (`0_mode=frozen` -> `0`), prefixed by folders where runs come from several places."""
    root = Path(_common_parent(paths))
    names = []
    for path in paths:
        parts = list(path.resolve().relative_to(root).parts) or [path.name]
        parts[-1] = re.match(r"(\d+)_", parts[-1]).group(1) if re.match(r"\d+_", parts[-1]) else parts[-1]
        names.append("/".join(parts))
    return names


def _common_parent(paths: list[Path]) -> str:
    resolved = [str(p.resolve()) for p in paths]
    return os.path.commonpath(resolved) if len(paths) > 1 else str(Path(resolved[0]).parent)


# ---- what a run wrote besides metrics.json ---------------------------------------------------
def read_overrides(overrides_file: Path) -> dict[str, str]:
    """`{key: value}` from Hydra's list of command-line overrides (`+key=v`, `~key` included)."""
    if not overrides_file.is_file():
        return {}  # a run started from Python, not from the command line
    entries = yaml.safe_load(overrides_file.read_text()) or []
    overrides = {}
    for entry in entries:
        key, _, value = str(entry).partition("=")
        overrides[key.lstrip("+~")] = value if "=" in str(entry) else "(deleted)"
    return overrides


def overrides_text(overrides: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "(no overrides)"


def _read_config(config_file: Path):
    try:
        return read_yaml(config_file)
    except UserError as error:  # truncated or edited: the run is listed as failed, naming the file
        raise BrokenRun(str(error)) from None


def _read_choices(hydra_file: Path) -> dict[str, str]:
    """Hydra's record of the config groups chosen (`hydra.runtime.choices`), {} when absent."""
    if not hydra_file.is_file():
        return {}
    try:
        record = yaml.safe_load(hydra_file.read_text()) or {}
        choices = record["hydra"]["runtime"]["choices"]
    except (yaml.YAMLError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in (choices or {}).items() if v is not None}


def _read_fewshot_counts(counts_file: Path) -> dict[str, int] | None:
    """The training images per class a few-shot run recorded; None for a run that used them all."""
    if not counts_file.is_file():
        return None
    counts = read_run_file(counts_file).get("per_class")
    if not isinstance(counts, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()
    ):
        raise BrokenRun(
            f"{counts_file} does not record a count of training images per class: remove the run or rerun it"
        )
    return counts


def read_run_file(path: Path) -> dict:
    """A run's JSON file, {} when missing; broken: the run is listed as failed, with the file named."""
    try:
        return read_json(path)
    except UserError as error:
        raise BrokenRun(str(error)) from None


def _config_value(config, key: str) -> str:
    """`key` in a composed config, as the command line would spell it; groups by their name."""
    if config is None:
        return MISSING
    absent = object()
    # Interpolations that need Hydra's runtime (paths.output_dir) cannot resolve here: None.
    value = OmegaConf.select(config, key, default=absent, throw_on_resolution_failure=False)
    if value is absent:
        return MISSING
    if isinstance(value, DictConfig):
        value = value.get("name", AS_CONFIGURED)  # a config group: mode=frozen is mode.name
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# ---- jobs that did not finish --------------------------------------------------------------
@dataclass
class UnfinishedJob:
    """A job folder without metrics.json: failed (it left an error record) or unfinished."""

    path: Path
    overrides: dict[str, str]
    error: str | None  # first line of the recorded error; None when the job left none

    @property
    def status(self) -> str:
        return "failed" if self.error is not None else "unfinished"

    @property
    def explanation(self) -> str:
        return (
            self.error
            if self.error is not None
            else "no metrics.json and no error record: still running, or killed"
        )


def load_unfinished(path: Path) -> UnfinishedJob:
    return UnfinishedJob(
        path=Path(path),
        overrides=read_overrides(path / ".hydra" / "overrides.yaml"),
        error=recorded_error(path),
    )


def recorded_error(job_dir: Path) -> str | None:
    """The first line of the error a failed job recorded: `failed.json` ("error") or `error.txt`."""
    record = job_dir / FAILED_RECORD
    if record.is_file():
        try:
            error = json.loads(record.read_text()).get("error")
        except (json.JSONDecodeError, AttributeError):
            error = None
        return _first_line(str(error)) if error else f"{FAILED_RECORD} holds no error message"
    text_record = job_dir / ERROR_TEXT
    if text_record.is_file():
        return _first_line(text_record.read_text(errors="replace")) or f"{ERROR_TEXT} is empty"
    return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
