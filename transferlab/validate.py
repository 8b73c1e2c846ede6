"""Checks that refuse bad input before anything is built, each with a one-line `UserError`.

Two moments:

- `check_command_line(argv)` runs before Hydra, because Hydra writes `.hydra/config.yaml`
  into the run dir before our code runs: a repeated `hydra.run.dir=SAME` would overwrite the
  first run's saved config before `run()` could refuse.
- `check_config(cfg, output_dir)` runs first thing in `run()`, on the composed config.

Checks that need the data or the network (class names, few-shot counts, image size) stay
where that knowledge lives (`transferlab.data`, `transferlab.models`); they still fail
before the trainer starts.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from transferlab.errors import UserError
from transferlab.runinfo import check_output_dir, ensure_writable, holds_run

#: Hydra flags that print something and exit without running a job
NO_JOB_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--resolve", "-p", "--package"}
NO_CHECKPOINT = (None, "", "null", "None")
#: settings that must be numbers: key -> (int or float, whether null is allowed); a typo like
#: data.batch_size=12a would otherwise end in a conversion error deep inside a constructor
NUMERIC_SETTINGS = {
    "seed": (int, False),
    "data.batch_size": (int, False),
    "data.eval_batch_size": (int, True),
    "data.val_size": (int, False),
    "data.image_size": (int, False),
    "data.num_workers": (int, False),
    "data.fewshot.per_class": (int, True),
    "data.fewshot.fraction": (float, True),
    "optimizer.lr": (float, False),
    "trainer.max_epochs": (int, False),
}


# ---- before Hydra ---------------------------------------------------------------------------
def check_command_line(argv: Sequence[str]) -> None:
    """Refuse a run dir that cannot be written or already holds a run (unless resuming)."""
    if NO_JOB_FLAGS.intersection(argv):
        return
    overrides = command_line_overrides(argv)
    resuming = overrides.get("ckpt_path") not in NO_CHECKPOINT
    if "-m" in argv or "--multirun" in argv:
        _check_sweep_dir(overrides.get("hydra.sweep.dir"), resuming)
        return
    run_dir = overrides.get("hydra.run.dir")
    if run_dir is None:
        _check_default_outputs_writable()
    elif "${" not in run_dir:  # an interpolation is only known once Hydra resolves it
        _check_creatable(Path(run_dir), "hydra.run.dir")
        if Path(run_dir).is_dir():
            check_output_dir(Path(run_dir), resuming)


def resume_overrides(argv: Sequence[str]) -> list[str]:
    """Extra Hydra overrides that keep a resumed run dir's first `.hydra/config.yaml`.

    Hydra saves the composed config into the run dir before the job starts; resuming in the
    same dir would replace the record of how the run began (and a refused resume with the
    wrong settings would leave the wrong record behind). Each resume saves its own config
    in `.hydra/resume-<time>/` instead.
    """
    overrides = command_line_overrides(argv)
    run_dir = overrides.get("hydra.run.dir")
    resuming = overrides.get("ckpt_path") not in NO_CHECKPOINT
    if "-m" in argv or "--multirun" in argv or not resuming or run_dir is None or "hydra.output_subdir" in overrides:
        return []
    if not (Path(run_dir) / ".hydra" / "config.yaml").is_file():
        return []
    return [f"hydra.output_subdir=.hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"]


def command_line_overrides(argv: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments as Hydra reads them, with `+`/`++` prefixes and outer quotes dropped."""
    overrides = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        overrides[key.lstrip("+")] = _unquote(value)
    return overrides


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _check_sweep_dir(sweep_dir: str | None, resuming: bool) -> None:
    if sweep_dir is None or "${" in sweep_dir:
        return  # the default sweep dir is new for every command (it ends in microseconds)
    folder = Path(sweep_dir)
    _check_creatable(folder, "hydra.sweep.dir")
    if folder.is_dir() and not resuming and any(holds_run(job) for job in folder.iterdir() if job.is_dir()):
        raise UserError(f"hydra.sweep.dir={folder} already holds runs; pick a new hydra.sweep.dir")


def _check_creatable(folder: Path, setting: str) -> None:
    """`folder` exists and is writable, or could be created; nothing is left behind.

    A folder created here would outlive a command that Hydra then rejects (an unknown
    config choice), so a missing folder is proven creatable with a temporary sibling.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder:
        ensure_writable(folder, setting)
        return
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".transferlab-write-test-"):
            pass
    except OSError as e:
        raise UserError(
            f"output dir {folder} cannot be created ({e.strerror or type(e).__name__} at {existing}); set {setting} to a writable folder"
        ) from None


def _check_default_outputs_writable() -> None:
    """The default run dir is `outputs/...` under the current folder (see conf/hydra/default.yaml)."""
    existing = Path.cwd() / "outputs"
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise UserError(f"{existing} is not writable, so the run cannot save its outputs there; run from a writable folder or set hydra.run.dir")


# ---- on the composed config -----------------------------------------------------------------
def check_config(cfg: DictConfig, output_dir: Path) -> None:
    check_output_dir(output_dir, resuming=cfg.get("ckpt_path") not in NO_CHECKPOINT)
    check_required(cfg)
    check_numbers(cfg)
    check_data_root(cfg.data)
    path = checkpoint_path(cfg.get("ckpt_path"), output_dir)
    if path is not None:
        check_checkpoint_matches(path, cfg)


def check_required(cfg: DictConfig) -> None:
    """Settings a config leaves as `???` (an experiment's `source`, `backbone=torchvision`'s name)."""
    from omegaconf import OmegaConf

    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise UserError(
            f"{', '.join(missing)} must be set (the config leaves {'it' if len(missing) == 1 else 'them'} as ???); "
            f"add {missing[0]}=... to the command line"
        )


def _missing_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [key for name, value in tree.items() for key in _missing_keys(value, f"{prefix}{name}.")]
    return [prefix[:-1]] if tree == "???" else []


def check_numbers(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    absent = object()
    for key, (kind, nullable) in NUMERIC_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent or (value is None and nullable):
            continue
        if not _is_number(value, kind):
            wanted = "an integer" if kind is int else "a number"
            raise UserError(f"{key}={value!r} is not {wanted}{' (or null)' if nullable else ''}")


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def check_data_root(data: DictConfig) -> None:
    """The data module's own `check_root` rule (see CIFARDataModule.check_root), before anything is built."""
    from hydra.utils import get_class

    module = get_class(data._target_)
    if hasattr(module, "check_root"):  # data modules whose file layout we know
        module.check_root(Path(str(data.root)).expanduser(), bool(data.get("download")))


# ---- resuming -------------------------------------------------------------------------------
def checkpoint_path(ckpt_path: Any, output_dir: Path) -> Path | None:
    """`ckpt_path=last` -> this run dir's `checkpoints/last.ckpt`; a path must exist.

    A run dir without last.ckpt that holds no run either, where a run was started (killed
    before its first save ended), has nothing to resume: `last` then starts the run from
    the beginning (None). In a folder where nothing ran, `last` is most likely a mistyped
    run dir: refused.
    """
    if ckpt_path in NO_CHECKPOINT:
        return None
    if ckpt_path == "last":
        from transferlab.runinfo import announce_fresh_start, was_started

        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
        if holds_run(output_dir):
            raise UserError(
                f"ckpt_path=last but {last} does not exist, though {output_dir} holds a run (metrics.json or other "
                f"checkpoints); resume from one of its checkpoints with ckpt_path=PATH, or pick a new hydra.run.dir"
            )
        if not was_started(output_dir):
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


def check_checkpoint_matches(path: Path, cfg: DictConfig) -> None:
    """The checkpoint to resume must be a Lightning checkpoint of a run on the same dataset.

    Whether its tensors fit this run's model is checked once the model exists
    (`transferlab.callbacks.guards.CheckpointFitsModel`): only the model knows its shapes.
    """
    trained_on = (checkpoint_meta(path).get("data") or {}).get("dataset")
    dataset = _dataset_name(cfg.data)
    if trained_on is not None and dataset is not None and trained_on != dataset:
        raise UserError(
            f"ckpt_path={path} was trained on {trained_on}, but this run uses {dataset}; resume with the settings "
            f"of the interrupted run (its .hydra/overrides.yaml), or use backbone.weights={path} to start a new "
            f"run from its backbone"
        )


def checkpoint_meta(path: Path) -> dict:
    """What transferlab recorded in a Lightning checkpoint (backbone, dataset); refuses other files."""
    import torch

    try:
        # mmap: only the small metadata is read, not every tensor of a large checkpoint.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"ckpt_path={path} is not a readable checkpoint ({type(e).__name__}); give a .ckpt written by transferlab") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"ckpt_path={path} is not a Lightning checkpoint (no state_dict); to start from plain weights use backbone.weights={path}"
        )
    meta = checkpoint.get("transferlab")
    return meta if isinstance(meta, dict) else {}


def _dataset_name(data: DictConfig) -> str | None:
    from hydra.utils import get_class

    return getattr(get_class(data._target_), "name", None)
