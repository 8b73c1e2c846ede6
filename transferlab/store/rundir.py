"""The run dir: one owner of the names of every file a run writes and reads.

    <run dir>/
      .hydra/config.yaml, overrides.yaml   how the run began (Hydra writes them; a resume: .hydra/resume-<time>/)
      train.log                            the run's log (console lines and one line per epoch)
      metrics.json, run_info.json          results; provenance, resumes, a probe's choice
      fewshot_indices.json                 the training images of a few-shot run
      confusion_matrix.csv, .png           per-class results of the test
      reliability.png                      the test's reliability diagram (before and after calibration)
      failed.json                          a sweep job that failed, and why
      checkpoints/last.ckpt                every epoch, for ckpt_path=last
      checkpoints/best-epochNNN.ckpt       the best epoch by val/acc (best-lbfgs.ckpt: a linear probe's solve;
                                           best-knn.ckpt, best-ncm.ckpt: mode=knn, mode=ncm)
      checkpoints/probe-lbfgs.ckpt         LP-FT's probe state (before fine-tuning), validated: the best
                                           checkpoint until an epoch beats its val/acc
      checkpoints/best-wise.ckpt           a WiSE-FT interpolation's chosen network (transferlab.interpolate),
                                           beside interpolate.csv, .md, .png: its results per alpha
      tensorboard/                         the curves
      .transferlab.lock                    the command writing here now (store.lock; gone when it ends)
      .transferlab.made-by                 which kind of command made the folder (train, rank, interpolate)

`RunDir(path)` names them; the readers and writers of the package go through it. Checkpoints
are read here too (`read_checkpoint`: one load per file version, memory-mapped), so the record
transferlab keeps in a checkpoint is read in one place.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from transferlab.store.backbone_file import with_backbone
from transferlab.store.files import write_atomically
from transferlab.utils.errors import UserError


class RunDir:
    """The files of one run dir, by what they are."""

    CONFIG = Path(".hydra") / "config.yaml"
    OVERRIDES = Path(".hydra") / "overrides.yaml"
    METRICS = "metrics.json"
    RUN_INFO = "run_info.json"
    FEWSHOT_INDICES = "fewshot_indices.json"
    CONFUSION_CSV = "confusion_matrix.csv"
    CONFUSION_PNG = "confusion_matrix.png"
    RELIABILITY_PNG = "reliability.png"
    FAILED = "failed.json"
    TRAIN_LOG = "train.log"
    CHECKPOINTS = "checkpoints"
    LAST = "last.ckpt"
    BEST_PATTERN = "best-*.ckpt"
    PROBE = "best-lbfgs.ckpt"  # a linear probe's solve (found by the best-*.ckpt pattern like any best)
    # LP-FT's probe state: the pretrained backbone and the solved head, before any fine-tuning epoch. Not a
    # best-*.ckpt: it stays when an epoch beats it, and last.ckpt records which of them is the best.
    PROBE_STATE = "probe-lbfgs.ckpt"
    # WiSE-FT (python -m transferlab.interpolate): the network at the chosen alpha, and the results per alpha
    WISE = "best-wise.ckpt"
    INTERPOLATE_CSV = "interpolate.csv"
    INTERPOLATE_MD = "interpolate.md"
    INTERPOLATE_PNG = "interpolate.png"
    TENSORBOARD = "tensorboard"
    LOCK = ".transferlab.lock"  # who writes here now (transferlab.store.lock)
    MADE_BY = ".transferlab.made-by"  # which kind of command made the folder

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- the files ---------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def overrides(self) -> Path:
        return self.path / self.OVERRIDES

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def run_info(self) -> Path:
        return self.path / self.RUN_INFO

    @property
    def fewshot_indices(self) -> Path:
        return self.path / self.FEWSHOT_INDICES

    @property
    def confusion_csv(self) -> Path:
        return self.path / self.CONFUSION_CSV

    @property
    def confusion_png(self) -> Path:
        return self.path / self.CONFUSION_PNG

    @property
    def reliability_png(self) -> Path:
        return self.path / self.RELIABILITY_PNG

    @property
    def failed(self) -> Path:
        return self.path / self.FAILED

    @property
    def train_log(self) -> Path:
        return self.path / self.TRAIN_LOG

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def probe(self) -> Path:
        return self.checkpoints / self.PROBE

    def solved(self, solver: str) -> Path:
        """The checkpoint of a solve instead of a fit: best-knn.ckpt, best-ncm.ckpt (best-lbfgs.ckpt: `probe`)."""
        return self.checkpoints / f"best-{solver}.ckpt"

    @property
    def probe_state(self) -> Path:
        return self.checkpoints / self.PROBE_STATE

    @property
    def wise(self) -> Path:
        return self.checkpoints / self.WISE

    @property
    def interpolate_csv(self) -> Path:
        return self.path / self.INTERPOLATE_CSV

    @property
    def interpolate_md(self) -> Path:
        return self.path / self.INTERPOLATE_MD

    @property
    def interpolate_png(self) -> Path:
        return self.path / self.INTERPOLATE_PNG

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def made_by(self) -> Path:
        return self.path / self.MADE_BY

    # ---- what the folder holds -----------------------------------------------------------------
    def holds_run(self) -> bool:
        """A run wrote here: its results or at least one complete checkpoint.

        Not a `.hydra/` of a failed start, nor a `checkpoints/` folder holding only the
        temporary file of a save that was killed: such a folder can be neither resumed
        (there is nothing to resume from) nor must it block a restart.
        """
        return self.metrics.exists() or bool(self.checkpoint_files())

    def was_started(self) -> bool:
        """A run began training here: it left a `checkpoints/` or `tensorboard/` folder.

        Hydra writes `.hydra/` (and train.log) for every command, also for the one asking;
        these two appear only once a run has set up its trainer.
        """
        return self.checkpoints.is_dir() or self.tensorboard.is_dir()

    def checkpoint_files(self) -> list[Path]:
        """The complete `*.ckpt` files (hidden temporary files of unfinished saves excluded)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            p for p in self.checkpoints.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")
        )

    def best_checkpoint(self, setting: str) -> Path:
        """The checkpoint the run dir stands for: its best by val/acc, else its last.

        The best is the one `last.ckpt` records (an LP-FT run's may be its probe state); without it,
        the `best-epochNNN.ckpt` of the latest epoch (file names order by epoch: zero-padded), else the
        probe state of an LP-FT run stopped before its first epoch ended.
        """
        last = self.last
        recorded = recorded_best_path(last) if last.is_file() else None
        if recorded is not None and not recorded.is_file():
            # the metrics.json of this run describe that file: another checkpoint would answer for it
            raise UserError(
                f"{setting}={self.path}: its best checkpoint {recorded.name}, which last.ckpt records and "
                f"metrics.json describes, is missing from {self.checkpoints}; restore it, or give "
                f"{last} to use the last epoch's weights"
            )
        best = recorded
        candidates = sorted(self.checkpoints.glob(self.BEST_PATTERN))
        probe_state = self.probe_state if self.probe_state.is_file() else None
        best = (
            best
            or (candidates[-1] if candidates else None)
            or probe_state
            or (last if last.is_file() else None)
        )
        if best is None:
            raise UserError(
                f"{setting}={self.path} is a folder without checkpoints/best-*.ckpt or last.ckpt (nor an LP-FT "
                f"{self.PROBE_STATE}); give the run dir of a finished transferlab run or a checkpoint file"
            )
        return best

    def saved_config(self) -> DictConfig | None:
        """The config the run began with (`.hydra/config.yaml`), if Hydra saved one."""
        return read_yaml(self.config)

    def read_metrics(self) -> dict:
        """metrics.json, with the numbers a resume adds to checked ({} before the run finished)."""
        metrics = read_json(self.metrics)
        for key in ("train_time_s", "features_time_s", "epochs"):
            value = metrics.get(key, 0)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise UserError(
                    f"{self.metrics}: {key}={value!r} is not a finite number >= 0; {BROKEN_JSON_FIX[self.METRICS]}"
                )
        return metrics

    def read_run_info(self) -> dict:
        """run_info.json ({} before the run wrote one), its list of resumes checked."""
        info = read_json(self.run_info)
        if not isinstance(info.get("resumes", []), list):
            raise UserError(
                f"{self.run_info}: its resumes are a {type(info['resumes']).__name__}, not a list; {BROKEN_JSON_FIX[self.RUN_INFO]}"
            )
        return info

    def check_writable(self, resuming: bool) -> None:
        """Refuse to write into a run dir that already holds a run, unless resuming it."""
        ensure_writable(self.path)
        if self.holds_run() and not resuming:
            raise UserError(
                f"{self.path} already holds a run; pick a new hydra.run.dir, or resume it with ckpt_path=last"
            )


# ---- checkpoints: one home for reading them and transferlab's record in them ------------------
def read_checkpoint(path: Path, setting: str) -> dict:
    """A Lightning checkpoint, memory-mapped (reading its metadata copies no tensor); refuses other files.

    `setting` names what the user gave (`ckpt_path`, `backbone.weights`, ...) for the error line.
    Read once per version of the file: a resume asks for its record, epochs and clock separately.
    """
    try:
        checkpoint = _load(*_version(path))
    except Exception as e:
        raise UserError(
            f"{setting}={path} is not a readable checkpoint ({type(e).__name__}); give a .ckpt written by transferlab"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{setting}={path} is not a Lightning checkpoint (no state_dict); give a .ckpt written by transferlab or its run dir"
        )
    # a checkpoint saved during a cached-feature fit that did not finish: its backbone is in a file beside it
    return with_backbone(checkpoint, Path(path))


def _version(path: Path) -> tuple[str, int, int]:
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> Any:
    # The file's version is part of the key: a checkpoint rewritten since is read again.
    import torch  # here: the command line's checks run before torch is imported (transferlab.__main__)

    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def transferlab_record(checkpoint: dict) -> dict:
    """What `TransferModule.on_save_checkpoint` recorded (data, backbone, classes, config); {} for other checkpoints."""
    record = checkpoint.get("transferlab")
    return record if isinstance(record, dict) else {}


def add_to_record(path: Path, entries: dict[str, Any]) -> None:
    """Set `entries` in transferlab's record of the checkpoint at `path` (what it learnt after it was
    saved: the temperature fitted after its test); the rest of the file is kept, and it is rewritten
    atomically (a killed rewrite leaves the checkpoint as it was)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(checkpoint.get("transferlab"), dict):
        checkpoint["transferlab"] = {}
    checkpoint["transferlab"].update(entries)
    write_atomically(Path(path), lambda f: torch.save(checkpoint, f))


def recorded_best(last: Path) -> Path | None:
    """The best checkpoint by val/acc that `last` records (ModelCheckpoint's state), if it is still there."""
    path = recorded_best_path(last)
    return path if path is not None and path.is_file() else None


def recorded_best_path(last: Path) -> Path | None:
    """Where the best checkpoint `last` records lies: always in `last`'s own folder (a moved or copied
    run dir's best is next to its `last`, never the file at the path recorded before the move, which
    may be another run's); None when `last` records none or cannot be read."""
    try:
        checkpoint = _load(*_version(last))
    except Exception:  # a broken last.ckpt (empty, truncated): the best-*.ckpt files still tell
        return None
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_path"):
            return last.parent / Path(state["best_model_path"]).name
    return None


def relocated(path: str, old_dir: str | Path, new_dir: str | Path) -> str:
    """`path` (a file under `old_dir`) under `new_dir` instead, if the file is there; else `path` unchanged."""
    try:
        moved = Path(new_dir) / Path(path).relative_to(old_dir)
    except ValueError:
        return str(path)
    return str(moved) if moved.is_file() else str(path)


#: `ckpt_path` values that mean "start a new run" (as typed on the command line, or composed)
NO_CHECKPOINT = (None, "", "null", "None")


def resumes(ckpt_path: object) -> bool:
    """Whether a `ckpt_path` setting asks to resume (`last` or a checkpoint path)."""
    return ckpt_path not in NO_CHECKPOINT


#: run dirs whose fresh start was announced (the checkpoint to resume is looked up several times)
_FRESH_STARTS_ANNOUNCED: set[Path] = set()


def announce_fresh_start(output_dir: Path) -> None:
    """Say, once per run dir, that `ckpt_path=last` found nothing to resume and starts over."""
    folder = Path(output_dir).resolve()
    if folder in _FRESH_STARTS_ANNOUNCED or not logging.getLogger().handlers:
        return  # said already; or asked before Hydra set up logging, where the line would be lost
    _FRESH_STARTS_ANNOUNCED.add(folder)
    logging.getLogger("transferlab").info(
        "ckpt_path=last: %s holds no complete checkpoint (its run was stopped before its first save ended); "
        "starting the run from the beginning",
        output_dir,
    )


def ensure_writable(folder: Path, setting: str = "hydra.run.dir") -> None:
    """Create `folder` and prove a file can be written in it; `setting` is what the user changes."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"output dir {folder} is not writable ({e.strerror or type(e).__name__}); set {setting} to a writable folder"
        ) from None


# ---- which checkpoint ------------------------------------------------------------------------
def checkpoint_path(ckpt_path: Any, output_dir: Path) -> Path | None:
    """`ckpt_path=last` -> this run dir's `checkpoints/last.ckpt`; a path must exist.

    An LP-FT run stopped after its probe stage, before its first epoch's save, has no last.ckpt but
    its probe state (`probe-lbfgs.ckpt`, a checkpoint of 0 epochs): `last` resumes from that, so the
    probe is not solved again. A run dir without either that holds no run either, where a run was started (killed
    before its first save ended), has nothing to resume: `last` then starts the run from
    the beginning (None). In a folder where nothing ran, `last` is most likely a mistyped
    run dir: refused.
    """
    if not resumes(ckpt_path):
        return None
    if ckpt_path == "last":
        run_dir = RunDir(output_dir)
        last = run_dir.last
        if last.is_file():
            return last
        if run_dir.probe_state.is_file():
            return run_dir.probe_state
        if run_dir.holds_run():
            raise UserError(
                f"ckpt_path=last but {last} does not exist, though {output_dir} holds a run (metrics.json or other "
                f"checkpoints); resume from one of its checkpoints with ckpt_path=PATH, or pick a new hydra.run.dir"
            )
        if not run_dir.was_started():
            raise UserError(
                f"ckpt_path=last but {last} does not exist and no run was started in {output_dir}; resume in the "
                f"run dir of the interrupted run (hydra.run.dir=...), or leave out ckpt_path to start a new run"
            )
        announce_fresh_start(output_dir)
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return path


def checkpoint_record(path: Path) -> dict:
    """What transferlab recorded in a Lightning checkpoint (backbone, dataset, config); refuses other files."""
    return transferlab_record(read_checkpoint(path, "ckpt_path"))


def checkpoint_epochs(path: Path) -> int:
    """Training epochs a Lightning checkpoint finished (its `epoch` is the 0-based epoch it was saved in)."""
    checkpoint = read_checkpoint(path, "ckpt_path")
    progress = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get(
        "current"
    ) or {}
    if "processed" in progress:
        return int(progress["processed"])
    return int(checkpoint.get("epoch", -1)) + 1


@dataclass(frozen=True)
class ResumeSource:
    """What a resume needs from disk, read here once: the checkpoint and its run dir's records."""

    checkpoint: Path
    record: dict  # transferlab's record in the checkpoint (backbone, dataset, config)
    trained_config: DictConfig | None  # the config it was trained with (see `trained_config`)
    epochs_done: int
    budgets: list[int]  # the max_epochs the run trained to: its first config's and each resume's
    finished: bool  # the run dir the resume runs in has its metrics.json


def resume_source(ckpt_path: Any, run_dir: Path) -> ResumeSource | None:
    """For a command that resumes (`ckpt_path`), everything on disk it is judged against; else None."""
    checkpoint = checkpoint_path(ckpt_path, run_dir)
    if checkpoint is None:
        return None
    record = checkpoint_record(checkpoint)
    saved = trained_config(checkpoint, record)
    budgets = [int(saved.trainer.max_epochs)] if saved is not None and "trainer" in saved else []
    resumes_ = RunDir(run_dir).read_run_info().get("resumes", [])
    budgets += [int(r["max_epochs"]) for r in resumes_ if isinstance(r, dict) and "max_epochs" in r]
    finished = RunDir(run_dir).metrics.is_file()
    return ResumeSource(checkpoint, record, saved, checkpoint_epochs(checkpoint), budgets, finished)


def trained_config(checkpoint: Path, record: dict) -> DictConfig | None:
    """The config `checkpoint` was trained with: recorded in it (`TransferModule.on_save_checkpoint`),
    else, for a checkpoint written before that, its run dir's first `.hydra/config.yaml`.

    Not the config of the run dir the resume runs in: resuming another run's checkpoint in a
    new dir, Hydra has just written this command's own config there.
    """
    recorded = record.get("config")
    if isinstance(recorded, dict):
        return OmegaConf.create(recorded)
    return RunDir(checkpoint.resolve().parent.parent).saved_config()


def current_run_config() -> dict | None:
    """This process's composed config as Hydra saved it (unresolved, as `config_changes` compares);
    None outside a Hydra job (tests that call `transferlab.train.run` directly)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if not hydra_cfg.output_subdir:
        return None
    saved = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir / RunDir.CONFIG.name
    config = read_yaml(saved)
    return None if config is None else OmegaConf.to_container(config, resolve=False)


#: what to do about a run's JSON file that is there but broken, by file name
BROKEN_JSON_FIX = {
    "metrics.json": "delete it and resume with ckpt_path=last (the checkpoints hold the run), or start a new run dir",
    "run_info.json": "restore it, or delete it (a resume then records a new one, without the run's earlier history)",
    ".transferlab.made-by": "delete it (the next command records which kind made the folder)",
}


def read_json(path: Path) -> dict:
    """A JSON object the run wrote (metrics.json, run_info.json, ...); {} when the file is missing.

    One that is there but unreadable, not JSON, or not an object is refused in one line naming it:
    read as {} it would pass for a run that recorded nothing (a finished run taken for a fresh one,
    its recorded history replaced)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        problem = f"cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    else:
        try:
            value = json.loads(text)
        except ValueError:
            problem = "is not valid JSON (truncated or edited?)"
        else:
            if isinstance(value, dict):
                return value
            problem = f"holds a {type(value).__name__}, not a JSON object"
    fix = BROKEN_JSON_FIX.get(path.name, "restore or delete it")
    raise UserError(f"{path} {problem}; {fix}")


#: what to do about a run's saved config (`.hydra/*.yaml`) that is there but broken
BROKEN_YAML_FIX = (
    "restore it from a copy, or start a new run dir (a resume compares the command with this record, "
    "so a run dir without a readable one cannot resume)"
)


def read_yaml(path: Path) -> DictConfig | ListConfig | None:
    """A YAML record Hydra saved into a run dir (`.hydra/config.yaml`, ...); None when it is missing.
    One that is there but cannot be read or parsed is refused in one line naming it (YAML's own
    error spans many)."""
    try:
        return OmegaConf.load(path)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        problem = f"cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    except Exception as e:  # yaml's ScannerError, ParserError, ...: a truncated or hand-edited file
        where = getattr(e, "problem_mark", None)
        problem = f"is not valid YAML{f' (line {where.line + 1})' if where else ''}"
    raise UserError(f"{path} {problem}; {BROKEN_YAML_FIX}")


def checkpoint_file(path: str | os.PathLike, setting: str) -> Path:
    """The checkpoint `path` stands for: the file itself, or a run dir's best checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            return RunDir(path).best_checkpoint(setting)
        except UserError:
            raise
        except Exception as error:  # its last.ckpt, read for the best checkpoint's name, is broken
            raise UserError(
                f"{setting}={path}: {RunDir(path).last} is not a readable checkpoint ({type(error).__name__}); "
                f"give one of the run's .ckpt files instead"
            ) from None
    if not path.is_file():
        raise UserError(
            f"{setting}={path} does not exist; give the run dir of a transferlab run or one of its .ckpt files"
        )
    return path
