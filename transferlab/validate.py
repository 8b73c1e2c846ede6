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

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from transferlab.errors import UserError, bad_argument, first_line
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
    "optimizer.weight_decay": (float, False),
    "optimizer.momentum": (float, False),
    "head.hidden": (int, False),
    "head.dropout": (float, False),
    "trainer.max_epochs": (int, False),
    "trainer.max_steps": (int, False),
    "trainer.limit_train_batches": (float, True),
    "trainer.limit_val_batches": (float, True),
    "trainer.limit_test_batches": (float, True),
}
#: backbone.weights values that mean a random init
NO_WEIGHTS = ("none", "null", "random", "")
#: scheduler steps tried on a stand-in optimizer before any data is read
SCHEDULER_TRIAL_STEPS = 3
#: seeds that numpy (and so Lightning's seed_everything) accepts
SEED_RANGE = (0, 2**32 - 1)


# ---- before Hydra ---------------------------------------------------------------------------
def check_command_line(argv: Sequence[str]) -> None:
    """Refuse overrides that do not compose, and a run dir that cannot be written or already
    holds a run (unless resuming)."""
    check_flags_before_overrides(argv)
    if NO_JOB_FLAGS.intersection(argv):
        return
    check_overrides_compose(argv)
    overrides = command_line_overrides(argv)
    resuming = overrides.get("ckpt_path") not in NO_CHECKPOINT
    if "-m" in argv or "--multirun" in argv:
        _check_sweep_dir(overrides.get("hydra.sweep.dir"), resuming)
        return
    run_dir = overrides.get("hydra.run.dir")
    if run_dir is None and overrides.get("ckpt_path") == "last":
        # The default run dir is new for every command: `last` would look in an empty folder.
        raise UserError("ckpt_path=last resumes the run in hydra.run.dir; add hydra.run.dir=<the run's folder>")
    if run_dir is None:
        _check_default_outputs_writable()
    elif "${" not in run_dir:  # an interpolation is only known once Hydra resolves it
        _check_creatable(Path(run_dir), "hydra.run.dir")
        if Path(run_dir).is_dir():
            check_output_dir(Path(run_dir), resuming)


def check_flags_before_overrides(argv: Sequence[str]) -> None:
    """Hydra's argument parser reads the overrides as one list: overrides on both sides of a flag
    (`backbone=cnn_small -m seed=1,2`) make it print its whole usage."""
    from hydra._internal.utils import get_args_parser

    try:
        _, unread = get_args_parser().parse_known_args(list(argv))
    except SystemExit:
        return  # a flag's own mistake (--cfg foo): argparse's message names it
    if not unread:
        return
    first_override = next((i for i, arg in enumerate(argv) if "=" in arg and not arg.startswith("-")), len(argv))
    late = [arg for arg in argv[first_override:] if arg.startswith("-") and "=" not in arg]
    if late:
        raise UserError(f"put {late[0]} before the overrides: python -m transferlab {late[0]} ... key=value ...")
    raise UserError(f"unrecognized arguments: {' '.join(unread)} (see python -m transferlab --help)")


def check_overrides_compose(argv: Sequence[str]) -> None:
    """Parse the overrides and compose the config once, as Hydra will, and refuse in one line
    what Hydra would report over many: a grammar error, a mistyped key, `~key` of a setting the
    run reads, an interpolation `${...}` that names no setting.

    Unknown config group choices (backbone=foo) are left to Hydra: its message lists the
    choices. A sweep (-m) is only parsed: its values are lists until the sweeper picks one.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = get_args_parser().parse_args(list(argv))
    parser = OverridesParser.create()
    for text in args.overrides:
        try:
            parser.parse_overrides([text])
        except OverrideParseException as error:
            raise UserError(
                f"{text} cannot be parsed ({first_line(error)}); quote a value with special characters "
                "(key='value'), see https://hydra.cc/docs/advanced/override_grammar/basic"
            ) from None
    if args.multirun or args.config_path or args.config_dir:
        return
    cfg = _compose_or_refuse(args.config_name or "train", args.overrides)
    if cfg is not None:
        _check_deletions(args.overrides, args.config_name or "train")
        _check_interpolations(cfg, args.overrides)


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from transferlab.runinfo import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(config_name, overrides=list(overrides))


def _compose_or_refuse(config_name: str, overrides: Sequence[str]) -> DictConfig | None:
    """The composed config; None when Hydra should report the failure itself (an unknown choice)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    try:
        return _compose(config_name, overrides)
    except MissingConfigException:
        return None  # backbone=foo: Hydra's message lists the available choices
    except ConfigCompositionException as error:
        cause = error.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
            raise _unknown_key(str(cause.full_key), config_name, overrides) from None
        raise UserError(f"{' '.join(first_line(error).split())} (in the overrides {' '.join(overrides)})") from None
    except Exception as error:  # a value of the wrong type for a typed node, ...
        raise UserError(f"the overrides do not compose: {first_line(error)}") from None


def _unknown_key(key: str, config_name: str, overrides: Sequence[str]) -> UserError:
    import difflib

    others = [o for o in overrides if _override_key(o) != key]
    try:
        known = list(_flatten(OmegaConf.to_container(_compose(config_name, others), resolve=False)))
    except Exception:
        known = []
    known += sorted({k.rsplit(".", 1)[0] for k in known if "." in k})
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return UserError(f"{key} is not a setting{hint} (+{key}=value adds a new one)")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def _check_deletions(overrides: Sequence[str], config_name: str) -> None:
    """`~key` of a single setting leaves the code reading a key that is gone; removing a whole
    group or node (~logger, ~callbacks.early_stopping) is how a config drops a component."""
    deleted = [o for o in overrides if o.startswith("~")]
    if not deleted:
        return
    defaults = _compose(config_name, [o for o in overrides if not o.startswith("~")])
    for override in deleted:
        key = _override_key(override)
        value = OmegaConf.select(defaults, key, default=None, throw_on_missing=False)
        if not isinstance(value, (DictConfig, ListConfig)) and value is not None:
            raise UserError(f"{override} removes a setting the run needs; set it instead ({key}=...)")


def _check_interpolations(cfg: DictConfig, overrides: Sequence[str], prefix: str = "") -> None:
    """Resolve every `${...}` except Hydra's own (`${hydra:...}` is only known inside the job)."""
    from omegaconf.errors import InterpolationResolutionError

    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else list(cfg.keys())
    for key in keys:
        full_key = f"{prefix}{key}"
        try:
            value = cfg[key]
        except InterpolationResolutionError as error:
            if "HydraConfig was not set" in str(error):
                continue
            source = next((o for o in overrides if _override_key(o) == full_key), full_key)
            raise UserError(
                f"{source}: {first_line(error)}; an interpolation ${{...}} must name an existing setting "
                "(quote a literal: key='\\${...}')"
            ) from None
        except Exception:
            continue  # ??? (missing) values are check_required's
        if isinstance(value, (DictConfig, ListConfig)):
            _check_interpolations(value, overrides, f"{full_key}.")


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
def check_config(cfg: DictConfig, output_dir: Path) -> ResumePlan | None:
    """Every check on the composed config; for a resume, what is left to do (see `resume_plan`)."""
    check_output_dir(output_dir, resuming=cfg.get("ckpt_path") not in NO_CHECKPOINT)
    check_required(cfg)
    check_numbers(cfg)
    check_mappings(cfg)
    check_seed(cfg.seed)
    check_training_budget(cfg.trainer, test=bool(cfg.get("test", True)))
    check_optimized_metric(cfg)
    check_mode(cfg)
    check_components(cfg)
    check_data_root(cfg.data)
    path = checkpoint_path(cfg.get("ckpt_path"), output_dir)
    if path is None:
        return None
    check_checkpoint_matches(path, cfg)
    return resume_plan(cfg, output_dir, path)


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


#: settings that must be groups of settings (or null), as `++data.fewshot=5` would replace one by a number
MAPPING_SETTINGS = {"data.fewshot": "data.fewshot.per_class=5 or data.fewshot.fraction=0.1"}


def check_mappings(cfg: DictConfig) -> None:
    for key, example in MAPPING_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, DictConfig):
            raise UserError(f"{key}={value!r} must be a group of settings, not a value; set one of its keys instead ({example})")


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def check_seed(seed: int) -> None:
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise UserError(f"seed={seed} must be an integer in [{low}, {high}]")


def check_training_budget(trainer: DictConfig, test: bool) -> None:
    """Settings under which the run would train nothing, forever, or measure nothing.

    Lightning accepts them all; the run would then write metrics of an untrained network
    (max_epochs=0, limit_train_batches=0) or never end (max_epochs=-1 without max_steps).
    """
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if max_epochs == 0:
        raise UserError("trainer.max_epochs=0 trains nothing, so the metrics would be an untrained network's; set trainer.max_epochs >= 1")
    if max_epochs == -1 and not (max_steps or 0) > 0:
        raise UserError("trainer.max_epochs=-1 trains forever unless trainer.max_steps > 0; set trainer.max_epochs >= 1, or +trainer.max_steps=N to train N steps")
    if max_steps == 0:
        raise UserError("trainer.max_steps=0 trains nothing; set trainer.max_steps=-1 (no step limit) or a positive number")
    every = trainer.get("check_val_every_n_epoch", 1)
    if every is not None and every <= 0:
        raise UserError(f"trainer.check_val_every_n_epoch={every} never validates, so no best checkpoint and no val/acc_best; set it to 1 (every epoch) or more")
    if every is not None and max_epochs is not None and max_epochs > 0 and every > max_epochs and not (max_steps or 0) > 0:
        raise UserError(
            f"trainer.check_val_every_n_epoch={every} with trainer.max_epochs={max_epochs} never validates, so no best checkpoint "
            f"and no val/acc_best; set trainer.check_val_every_n_epoch<={max_epochs}"
        )
    # Validation picks the best checkpoint and gives val/acc_best; the test gives test/*.
    limits = {"limit_train_batches": "trains nothing", "limit_val_batches": "never validates, so no best checkpoint and no val/acc_best"}
    if test:
        limits["limit_test_batches"] = "tests nothing (use test=false to skip the test)"
    for key, consequence in limits.items():
        value = trainer.get(key)
        if value is not None and value <= 0:
            raise UserError(f"trainer.{key}={value} {consequence}; set it to a fraction in (0, 1] or a number of batches >= 1")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(key)
        if isinstance(value, float) and value > 1:  # Lightning reads a float as a fraction of the batches
            raise UserError(
                f"trainer.{key}={value} is a fraction above 1; set a fraction in (0, 1] or a whole number of batches "
                f"(trainer.{key}={int(value)})"
            )


def check_validates(trainer: DictConfig, datamodule: Any) -> None:
    """After the data is read: the run reaches its first validation (else no val/acc_best).

    Lightning validates at the end of an epoch; trainer.max_steps can stop it earlier, and
    an empty validation split (data.val_size=0) validates nothing.
    """
    if datamodule.val is not None and len(datamodule.val) == 0:
        raise UserError("data.val_size=0 leaves no validation images, so no best checkpoint and no val/acc_best; set data.val_size >= 1")
    max_steps = trainer.get("max_steps", -1) or -1
    if max_steps <= 0:
        return
    batches = len(datamodule.train_dataloader())
    limit = trainer.get("limit_train_batches")
    if limit is not None:
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * float(limit))  # as Lightning reads it
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    steps_to_validation = -(-batches // accumulate) * int(trainer.get("check_val_every_n_epoch", 1) or 1)
    if max_steps < steps_to_validation:
        raise UserError(
            f"trainer.max_steps={max_steps} stops before the first validation (after {steps_to_validation} steps), so no best "
            f"checkpoint and no val/acc_best; set trainer.max_steps>={steps_to_validation} or use trainer.max_epochs"
        )


def check_optimized_metric(cfg: DictConfig) -> None:
    """The value a sweeper optimizes must be one the run measures."""
    metric = cfg.get("optimized_metric")
    if metric and str(metric).startswith("test/") and not cfg.get("test", True):
        raise UserError(f"optimized_metric={metric} is only measured with test=true; optimize a val/ metric (val/acc_best)")
    logged = logged_metrics()
    if metric and str(metric) not in logged:
        import difflib

        close = difflib.get_close_matches(str(metric), logged, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"optimized_metric={metric} is not a metric of the run; {hint}the run logs {', '.join(logged)}")


def logged_metrics() -> list[str]:
    """The names TransferModule logs (its `self.log("...")` calls), read from its source so the
    list cannot drift from the model; reading the file keeps torch unimported here."""
    import importlib.util
    import re

    origin = importlib.util.find_spec("transferlab.models.module").origin
    return sorted(set(re.findall(r"""self\.log\(\s*["']([^"']+)["']""", Path(origin).read_text())))


def check_mode(cfg: DictConfig) -> None:
    """A gradual unfreeze that never happens is a frozen run under another name; a frozen random
    backbone is a legitimate baseline, but easy to run by accident."""
    mode = cfg.get("mode") or {}
    unfreeze_at = mode.get("unfreeze_at_epoch")
    max_epochs = cfg.trainer.get("max_epochs")
    if unfreeze_at is not None and max_epochs is not None and max_epochs > 0 and unfreeze_at >= max_epochs:
        raise UserError(
            f"mode.unfreeze_at_epoch={unfreeze_at} with trainer.max_epochs={max_epochs}: the backbone never unfreezes "
            f"(epochs count from 0); set mode.unfreeze_at_epoch<{max_epochs} or trainer.max_epochs>{unfreeze_at}"
        )
    weights = (cfg.get("backbone") or {}).get("weights", "imagenet")
    if mode.get("name") == "frozen" and (not mode.get("pretrained", True) or str(weights).lower() in NO_WEIGHTS):
        logging.getLogger("transferlab").warning(
            "mode=frozen with random weights: the backbone is a fixed random feature extractor (backbone.weights=%s)", weights
        )


def check_components(cfg: DictConfig) -> None:
    """Build the optimizer, scheduler and head once with stand-in inputs, before any data is read.

    Their constructors check their own arguments (torch.optim's "Invalid learning rate", a
    head's hidden size), but the real ones are built late: the optimizer only inside
    `trainer.fit`. A refusal here reads `<group>: <reason>`.
    """
    import torch
    from hydra.utils import instantiate

    momentum = cfg.optimizer.get("momentum")
    if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
        raise UserError(f"optimizer.momentum={momentum} must be in [0, 1) (0.9 is usual); at 1 or above the updates grow without bound")
    with _building("optimizer"):
        optimizer = instantiate(cfg.optimizer)([torch.zeros(1, requires_grad=True)])
    if cfg.get("scheduler"):
        with _building("scheduler"):
            scheduler = instantiate(cfg.scheduler)(optimizer)
            # A few steps too: StepLR(step_size=0) only fails (ZeroDivisionError) once it steps.
            for _ in range(SCHEDULER_TRIAL_STEPS):
                optimizer.step()
                scheduler.step()
    with _building("head"):
        instantiate(cfg.head, in_features=8, num_classes=2)


@contextmanager
def _building(component: str) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        refusal = bad_argument(component, error)
        if refusal is None:
            raise
        raise refusal from error


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


# ---- what a resume may change, and what is left to do --------------------------------------
#: settings a resume may change: where the run reads its data and executes, what it prints,
#: and what happens after training; none of them changes a trained number. Everything else
#: (data, subset, backbone, head, mode, optimizer, scheduler, seed, model, the trainer's
#: precision, devices, ...) defines the experiment. `trainer.max_epochs` may only be raised.
RESUME_MAY_CHANGE = (
    "ckpt_path", "test", "optimized_metric", "task_name", "paths.output_dir",
    "data.root", "data.download", "data.num_workers", "data.eval_batch_size", "data.in_memory",
    "trainer.accelerator", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "callbacks.progress_bar", "model.compile", "model.channels_last",
    # bookkeeping that changes no trained number (runs from before these existed stay resumable)
    "callbacks.model_checkpoint._target_", "callbacks.last_checkpoint._target_", "callbacks.schedule_follows_budget",
)


@dataclass(frozen=True)
class ResumePlan:
    """A resume of the run in `run_dir` from `checkpoint`."""

    run_dir: Path
    checkpoint: Path
    epochs_done: int  # epochs the checkpoint finished
    max_epochs: int  # this command's budget
    previous_max_epochs: int  # the budget the run last trained to
    finished: bool  # metrics.json is there
    test: bool  # this command tests the best checkpoint

    @property
    def budget_raised(self) -> bool:
        return self.max_epochs > self.previous_max_epochs

    @property
    def trains(self) -> bool:
        return self.epochs_done < self.max_epochs and (not self.finished or self.budget_raised)

    def previous_metrics(self) -> dict:
        return read_json(self.run_dir / "metrics.json") if self.finished else {}

    @property
    def nothing_to_do(self) -> bool:
        """A finished run with no epoch left to train and no test left to run."""
        untested = self.test and not any(k.startswith("test/") for k in self.previous_metrics())
        return self.finished and not self.trains and not untested

    def describe(self) -> str:
        return (
            f"{self.run_dir} already trained {_epochs(self.epochs_done)} of trainer.max_epochs={self.previous_max_epochs} "
            f"and wrote its metrics.json; nothing to do, nothing written (raise trainer.max_epochs to train longer)"
        )


def resume_plan(cfg: DictConfig, run_dir: Path, checkpoint: Path) -> ResumePlan:
    """Refuse a resume that would change the experiment, else say what is left to do.

    The config the checkpoint was trained with is the reference (`trained_config`), wherever
    the resume runs: a resume that changed the few-shot size, the classes or the learning rate
    would end as a mix of two experiments under the first one's name.
    """
    saved = trained_config(checkpoint)
    if saved is not None:
        changed = config_changes(saved, cfg)
        if changed:
            raise UserError(
                f"resuming {checkpoint} with settings that change the experiment: {', '.join(changed[:6])}"
                f"{f' (and {len(changed) - 6} more)' if len(changed) > 6 else ''}; resume with the run's own settings "
                f"(its .hydra/overrides.yaml), or start a new run (a new hydra.run.dir) from backbone.weights={checkpoint}"
            )
    epochs_done = checkpoint_epochs(checkpoint)
    max_epochs = int(cfg.trainer.max_epochs)
    previous = _previous_budget(run_dir, saved, default=max_epochs)
    if max_epochs < previous:
        raise UserError(
            f"trainer.max_epochs={max_epochs} is lower than the run's {previous}; a resume may only raise it "
            f"(trainer.max_epochs>={previous})"
        )
    if max_epochs < epochs_done:
        raise UserError(
            f"ckpt_path={checkpoint} already trained {_epochs(epochs_done)}, more than trainer.max_epochs={max_epochs}; "
            f"set trainer.max_epochs>={epochs_done}"
        )
    finished = (run_dir / "metrics.json").is_file()
    return ResumePlan(run_dir, checkpoint, epochs_done, max_epochs, previous, finished, bool(cfg.get("test", True)))


def config_changes(saved: DictConfig, current: DictConfig) -> list[str]:
    """The keys (dotted) whose value differs, or that only one of the configs has, outside RESUME_MAY_CHANGE.

    Compared unresolved, as written: `scheduler.T_max: ${trainer.max_epochs}` is the same
    setting in both, and its source key is compared on its own.
    """
    before = _flatten(OmegaConf.to_container(saved, resolve=False))
    after = _flatten(OmegaConf.to_container(current, resolve=False))
    keys = sorted(set(before) | set(after))
    return [
        f"{key} ({_shown(before.get(key, _ABSENT))} -> {_shown(after.get(key, _ABSENT))})"
        for key in keys
        if before.get(key, _ABSENT) != after.get(key, _ABSENT) and not _may_change(key)
    ]


def trained_config(checkpoint: Path) -> DictConfig | None:
    """The config `checkpoint` was trained with: recorded in it (`TransferModule.on_save_checkpoint`),
    else, for a checkpoint written before that, its run dir's first `.hydra/config.yaml`.

    Not the config of the run dir the resume runs in: resuming another run's checkpoint in a
    new dir, Hydra has just written this command's own config there.
    """
    recorded = checkpoint_meta(checkpoint).get("config")
    if isinstance(recorded, dict):
        return OmegaConf.create(recorded)
    return _saved_config(checkpoint.resolve().parent.parent)


def current_run_config() -> dict | None:
    """This process's composed config as Hydra saved it (unresolved, as `config_changes` compares);
    None outside a Hydra job (tests that call `transferlab.train.run` directly)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if not hydra_cfg.output_subdir:
        return None
    saved = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(saved), resolve=False) if saved.is_file() else None


def checkpoint_epochs(path: Path) -> int:
    """Training epochs a Lightning checkpoint finished (its `epoch` is the 0-based epoch it was saved in)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    progress = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current") or {}
    if "processed" in progress:
        return int(progress["processed"])
    return int(checkpoint.get("epoch", -1)) + 1


def resume_plan_before_hydra(argv: Sequence[str]) -> ResumePlan | None:
    """The same checks as `check_config`'s, for a resume in place, before Hydra writes anything.

    Hydra appends to the run's log and saves the command's config before `run()` starts; a
    refused resume, or a finished run resumed with nothing to do, must leave the run dir as
    it was. None when this is no resume in place (or the config does not compose: Hydra
    then reports that itself).
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser

    from transferlab.runinfo import config_dir

    if NO_JOB_FLAGS.intersection(argv) or "-m" in argv or "--multirun" in argv:
        return None
    overrides = command_line_overrides(argv)
    run_dir = overrides.get("hydra.run.dir")
    if overrides.get("ckpt_path") in NO_CHECKPOINT or run_dir is None or _saved_config(Path(run_dir)) is None:
        return None  # (a ckpt_path set in a config file is still checked in `run`)
    args = get_args_parser().parse_args(list(argv))
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            cfg = compose(args.config_name or "train", overrides=args.overrides)
    except Exception:
        return None
    path = checkpoint_path(cfg.get("ckpt_path"), Path(run_dir))
    if path is None:
        return None
    check_checkpoint_matches(path, cfg)
    return resume_plan(cfg, Path(run_dir), path)


_ABSENT = object()


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE + ("trainer.max_epochs",))


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else str(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for name, value in tree.items() for k, v in _flatten(value, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def _saved_config(run_dir: Path) -> DictConfig | None:
    saved = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(saved) if saved.is_file() else None


def _previous_budget(run_dir: Path, saved: DictConfig | None, default: int) -> int:
    """The max_epochs the run last trained to: its first config's, or a later resume's (run_info.json)."""
    budgets = [int(saved.trainer.max_epochs)] if saved is not None and "trainer" in saved else []
    budgets += [int(r["max_epochs"]) for r in read_json(run_dir / "run_info.json").get("resumes", []) if "max_epochs" in r]
    return max(budgets) if budgets else default


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
