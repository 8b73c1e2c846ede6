"""The command line, checked before Hydra starts, each refusal a one-line `UserError`.

Before Hydra, because Hydra writes `.hydra/config.yaml` into the run dir before our code
runs: a repeated `hydra.run.dir=SAME` would overwrite the first run's saved config before
`run()` could refuse. The overrides are read by Hydra's own parser (`+k=v`, `~k`, quotes,
sweeps) and composed once, as Hydra will, so a mistake gets one line instead of Hydra's
traceback. Checks of the composed config belong to the components (`transferlab.config`).
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

from hydra._internal.utils import get_args_parser as _hydra_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError

from transferlab.config import check_config_itself, check_required, compose, dotted_settings
from transferlab.run.budget import check_training_budget
from transferlab.run.resume import (
    ResumePlan,
    check_record_agrees,
    check_resume,
    may_change_on_resume,
    settings_as_it_ran,
    settings_of_changed_presets,
)
from transferlab.store.lock import TRAIN, RunDirLock, check_owner, describe, live_owner
from transferlab.store.rundir import RunDir, ensure_writable, resume_source, resumes
from transferlab.utils.errors import UserError, first_line, user_errors_as_one_line


def hydra_args_parser():
    """Hydra's own command-line parser, fenced here (the package's one use of `hydra._internal`):
    the checks before Hydra must read argv exactly as `@hydra.main` will (flags, `-m`, overrides),
    and Hydra 1.3 has no public parser. Pinned by `hydra-core<1.4`; tests/cli cover each use."""
    return _hydra_args_parser()


#: Hydra flags that print something and exit without running a job
NO_JOB_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--resolve",
    "-p",
    "--package",
}


def check_command_line(argv: Sequence[str]) -> None:
    """Refuse overrides that do not compose, and a run dir that cannot be written, that another
    command is writing, that another kind of command made, or that already holds a run (unless
    resuming)."""
    check_flags_before_overrides(argv)
    if NO_JOB_FLAGS.intersection(argv):
        return
    check_overrides_compose(argv)
    overrides = command_line_overrides(argv)
    resuming = resumes(overrides.get("ckpt_path"))
    if is_sweep(argv):
        if "hydra.run.dir" in overrides:  # Hydra would write the sweep's jobs elsewhere without a word
            raise UserError(
                "-m runs a sweep, whose jobs go under hydra.sweep.dir, not hydra.run.dir; give "
                "hydra.sweep.dir=... (or drop -m for one run)"
            )
        _check_sweep_dir(overrides.get("hydra.sweep.dir"), resuming)
        return
    run_dir = overrides.get("hydra.run.dir")
    if run_dir is None and overrides.get("ckpt_path") == "last":
        # The default run dir is new for every command: `last` would look in an empty folder.
        raise UserError(
            "ckpt_path=last resumes the run in hydra.run.dir; add hydra.run.dir=<the run's folder>"
        )
    if run_dir is None:
        _check_default_outputs_writable()
    elif "${" not in run_dir:  # an interpolation is only known once Hydra resolves it
        _check_creatable(Path(run_dir), "hydra.run.dir")
        if Path(run_dir).is_dir():
            check_owner(Path(run_dir), TRAIN)  # first: a running command is why the folder looks as it does
            RunDir(run_dir).check_writable(resuming)


def is_sweep(argv: Sequence[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def check_flags_before_overrides(argv: Sequence[str]) -> None:
    """Hydra's argument parser reads the overrides as one list: overrides on both sides of a flag
    (`backbone=cnn_small -m seed=1,2`) make it print its whole usage."""
    try:
        _, unread = hydra_args_parser().parse_known_args(list(argv))
    except SystemExit:
        return  # a flag's own mistake (--cfg foo): argparse's message names it
    if not unread:
        return
    first_override = next(
        (i for i, arg in enumerate(argv) if "=" in arg and not arg.startswith("-")), len(argv)
    )
    late = [arg for arg in argv[first_override:] if arg.startswith("-") and "=" not in arg]
    if late:
        raise UserError(
            f"put {late[0]} before the overrides: python -m transferlab {late[0]} ... key=value ..."
        )
    raise UserError(f"unrecognized arguments: {' '.join(unread)} (see python -m transferlab --help)")


def check_overrides_compose(argv: Sequence[str]) -> None:
    """Parse the overrides and compose the config once, as Hydra will, and refuse in one line
    what Hydra would report over many: a grammar error, a mistyped key, `~key` of a setting the
    run reads, an interpolation `${...}` that names no setting.

    An unknown group choice (backbone=foo) gets one line with the nearest choice and the list
    (Hydra's own message spans 16 lines). A sweep (-m) is only parsed: its values are lists
    until the sweeper picks one, and Hydra reports a bad choice in it.
    """
    args = hydra_args_parser().parse_args(list(argv))
    for text in args.overrides:
        try:
            _parse(text)
        except OverrideParseException as error:
            raise UserError(
                f"{text} cannot be parsed ({first_line(error)}); quote a value with special characters "
                "(key='value'), see https://hydra.cc/docs/advanced/override_grammar/basic"
            ) from None
    if args.multirun or args.config_path or args.config_dir:
        return
    cfg = _compose_or_refuse(args.config_name or "train", args.overrides)
    _check_deletions(args.overrides, args.config_name or "train")
    check_required(cfg)  # before the interpolations: `${source}` of an unset source says "set source"
    _check_interpolations(cfg, args.overrides)
    if (args.config_name or "train") == "train":
        # The checks that read the composed config alone, here too, answered before Lightning is
        # imported (the job repeats them, build.check_config, with the rest): the cheapest first,
        # before torch is imported, then the whole list (run.checks: torch at most).
        check_config_itself(cfg)
        check_training_budget(cfg.trainer, test=bool(cfg.get("test", True)))
        from transferlab.run.checks import check_settings  # torch: a second or two

        with _logging_off():  # its warnings (random weights, ...) are the job's to log, once, in train.log
            check_settings(cfg)


@contextmanager
def _logging_off() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def command_line_overrides(argv: Sequence[str]) -> dict[str, str | None]:
    """The `key=value` overrides in `argv` as Hydra reads them (`+`/`++`/`~` and quotes dropped),
    values as text (a sweep's as typed, `null` as None); what Hydra cannot parse is left out
    (Hydra reports it)."""
    overrides = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue  # a flag, or a flag's value (--config-name train)
        try:
            override = _parse(arg)
        except OverrideParseException:
            continue
        overrides[override.key_or_group] = _value_text(override)
    return overrides


def _parse(text: str):
    return OverridesParser.create().parse_overrides([text])[0]


def _value_text(override) -> str | None:
    if override.is_sweep_override():
        return override.input_line.split("=", 1)[1]
    value = override.value()
    return None if value is None else str(value)


def _override_key(text: str) -> str:
    """The setting an override names (`~data.root`, `+x=1`, `key=value`: data.root, x, key)."""
    try:
        return _parse(text).key_or_group
    except OverrideParseException:
        return text.split("=", 1)[0].lstrip("~+")


def _compose_or_refuse(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """The composed config, or a one-line refusal of what does not compose."""
    try:
        return compose(config_name, overrides)
    except MissingConfigException as error:
        raise _unknown_choice(error) from None
    except ConfigCompositionException as error:
        cause = error.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
            raise _unknown_key(str(cause.full_key), config_name, overrides) from None
        raise UserError(
            f"{' '.join(first_line(error).split())} (in the overrides {' '.join(overrides)})"
        ) from None
    except Exception as error:  # a value of the wrong type for a typed node, ...
        raise UserError(f"the overrides do not compose: {first_line(error)}") from None


def _unknown_choice(error: MissingConfigException) -> UserError:
    """`mode=frozzen`: the group, the nearest choice and all of them, in one line."""
    missing = str(error.missing_cfg_file or "")
    if "/" not in missing or not error.options:
        return UserError(first_line(error))  # a config file itself missing (--config-name foo)
    group, choice = missing.rsplit("/", 1)
    close = difflib.get_close_matches(choice, error.options, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return UserError(
        f"{group}={choice} is not a choice of {group}{hint} (choices: {', '.join(error.options)}; "
        f"each is a file in conf/{group}/)"
    )


def _unknown_key(key: str, config_name: str, overrides: Sequence[str]) -> UserError:
    others = [o for o in overrides if _override_key(o) != key]
    try:
        known = list(dotted_settings(OmegaConf.to_container(compose(config_name, others), resolve=False)))
    except Exception:
        known = []
    known += sorted({k.rsplit(".", 1)[0] for k in known if "." in k})
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return UserError(f"{key} is not a setting{hint} (+{key}=value adds a new one)")


def _check_deletions(overrides: Sequence[str], config_name: str) -> None:
    """`~key` of a single setting leaves the code reading a key that is gone; removing a whole
    group or node (~logger, ~callbacks.early_stopping) is how a config drops a component."""
    deleted = [o for o in overrides if o.startswith("~")]
    if not deleted:
        return
    defaults = compose(config_name, [o for o in overrides if not o.startswith("~")])
    for override in deleted:
        key = _override_key(override)
        value = OmegaConf.select(defaults, key, default=None, throw_on_missing=False)
        if not isinstance(value, (DictConfig, ListConfig)) and value is not None:
            raise UserError(f"{override} removes a setting the run needs; set it instead ({key}=...)")


def _check_interpolations(cfg: DictConfig, overrides: Sequence[str], prefix: str = "") -> None:
    """Resolve every `${...}` except Hydra's own (`${hydra:...}` is only known inside the job)."""
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


def _check_sweep_dir(sweep_dir: str | None, resuming: bool) -> None:
    if sweep_dir is None or "${" in sweep_dir:
        return  # the default sweep dir is new for every command (it ends in microseconds)
    folder = Path(sweep_dir)
    _check_creatable(folder, "hydra.sweep.dir")
    jobs = sorted(job for job in folder.iterdir() if job.is_dir()) if folder.is_dir() else []
    busy = next(((job, owner) for job in jobs if (owner := live_owner(job)) is not None), None)
    if busy is not None:
        raise UserError(
            f"hydra.sweep.dir={folder} is in use: its job {busy[0].name} is being written by {describe(busy[1])}; "
            "wait for that sweep to end, or pick a new hydra.sweep.dir (nothing was changed)"
        )
    if not resuming and any(RunDir(job).holds_run() for job in jobs):
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
        raise UserError(
            f"{existing} is not writable, so the run cannot save its outputs there; run from a writable folder or set hydra.run.dir"
        )


# ---- the run dir's owner, before Hydra -------------------------------------------------------
def run_dir_before_hydra(argv: Sequence[str]) -> Path | None:
    """The run dir a single run names on the command line (hydra.run.dir); None for a sweep, a
    command that runs no job, the default run dir or one with an interpolation (known only to Hydra)."""
    if NO_JOB_FLAGS.intersection(argv) or is_sweep(argv):
        return None
    run_dir = command_line_overrides(argv).get("hydra.run.dir")
    return None if run_dir is None or "${" in run_dir else Path(run_dir)


@contextmanager
def run_dir_owned_before_hydra(argv: Sequence[str], command: str = TRAIN) -> Iterator[None]:
    """Own the run dir named on the command line for the block around Hydra (`store.lock.owned`):
    Hydra writes `.hydra/` there at job start, before any code of ours could refuse. A refusal is
    one line (exit 2). Where the dir is not known here, the job takes it when it starts."""
    folder = run_dir_before_hydra(argv)
    if folder is None:
        yield
        return
    lock = RunDirLock(folder, command)
    with user_errors_as_one_line():
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ---- a resume in place, before Hydra ---------------------------------------------------------
def resume_before_hydra(argv: Sequence[str]) -> tuple[list[str], ResumePlan | None]:
    """For a resume in place, before Hydra writes anything: the overrides that resume an older run as
    it ran, and the same checks as `check_resume`'s (the config composed once for both).

    Hydra appends to the run's log and saves the command's config before `run()` starts; a
    refused resume, or a finished run resumed with nothing to do, must leave the run dir as
    it was. ([], None) when this is no resume in place (or the config does not compose: Hydra
    then reports that itself).
    """
    if NO_JOB_FLAGS.intersection(argv) or is_sweep(argv):
        return [], None
    overrides = command_line_overrides(argv)
    run_dir = overrides.get("hydra.run.dir")
    if not resumes(overrides.get("ckpt_path")) or run_dir is None:
        return [], None
    args = hydra_args_parser().parse_args(list(argv))
    name = args.config_name or "train"
    try:
        cfg = compose(name, args.overrides)
    except Exception:
        return [], None
    _check_checkpoint_belongs(cfg, Path(run_dir))  # before any setting is taken from the checkpoint
    added = _settings_of_an_older_run(cfg, overrides, Path(run_dir))
    if added:
        cfg = compose(name, [*args.overrides, *added])  # composed before with these settings' defaults
    changed = _presets_as_they_were(name, args.overrides, added, Path(run_dir), overrides.get("ckpt_path"))
    if changed:
        added += changed
        cfg = compose(name, [*args.overrides, *added])
    if RunDir(run_dir).saved_config() is None:
        return added, None  # (a ckpt_path set in a config file is still checked in `run`)
    return added, check_resume(cfg, Path(run_dir))


def _check_checkpoint_belongs(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a checkpoint whose record disagrees with its run dir's config.yaml (`check_record_agrees`);
    a checkpoint that cannot be read is left to `check_resume`, which says what is wrong."""
    try:
        source = resume_source(cfg.get("ckpt_path"), run_dir)
    except Exception:
        return
    if source is not None:
        check_record_agrees(source)


def _settings_of_an_older_run(cfg: DictConfig, overrides: dict, run_dir: Path) -> list[str]:
    """For a run recorded before some settings existed whose default now differs from what it did
    (e.g. `mode.callback.train_bn` of lp_ft), the overrides that resume it as it ran, said in one
    line; [] otherwise, or where the command line sets them itself."""
    try:
        source = resume_source(cfg.get("ckpt_path"), run_dir)
    except Exception:
        return []  # check_resume says what is wrong
    if source is None or source.trained_config is None:
        return []
    added = {k: v for k, v in settings_as_it_ran(source.trained_config, cfg).items() if k not in overrides}
    if added:
        settings = " ".join(f"{key}={value}" for key, value in added.items())
        print(
            f"transferlab: {run_dir} was recorded before {', '.join(added)} existed; resuming as it ran: {settings}",
            flush=True,
        )
    return [f"{key}={value}" for key, value in added.items()]


def _presets_as_they_were(
    name: str, command: list[str], added: list[str], run_dir: Path, ckpt_path: str | None
) -> list[str]:
    """A run resumed with the very overrides it was started with (`.hydra/overrides.yaml`; settings
    a resume may change aside) whose presets or defaults changed since: the overrides that resume it
    with the settings it was recorded with, said in one line; [] otherwise (a resume with other
    overrides is compared as it is, and refused where it changes the experiment)."""
    recorded_file = RunDir(run_dir).overrides
    try:
        recorded = [str(x) for x in OmegaConf.load(recorded_file)] if recorded_file.is_file() else None
    except Exception:
        return []
    if recorded is None or _task_settings(recorded) != _task_settings(command):
        return []
    try:
        source = resume_source(ckpt_path, run_dir)
    except Exception:
        return []
    if source is None or source.trained_config is None:
        return []
    putting_back = settings_of_changed_presets(
        source.trained_config, lambda extra: compose(name, [*command, *added, *extra])
    )
    if putting_back:
        print(
            f"transferlab: the presets or defaults {run_dir} was started with have changed since; resuming with "
            f"the settings it was recorded with: {' '.join(putting_back)}",
            flush=True,
        )
    return putting_back or []


def _task_settings(overrides: Sequence[str]) -> dict[str, str | None]:
    """key -> value of the overrides that define the experiment (what a resume may change left out)."""
    return {
        key: value
        for key, value in command_line_overrides(overrides).items()
        if not key.startswith("hydra.") and not may_change_on_resume(key)
    }


def resume_overrides(argv: Sequence[str]) -> list[str]:
    """Extra Hydra overrides that keep a resumed run dir's first `.hydra/config.yaml`.

    Hydra saves the composed config into the run dir before the job starts; resuming in the
    same dir would replace the record of how the run began (and a refused resume with the
    wrong settings would leave the wrong record behind). Each resume saves its own config
    in `.hydra/resume-<time>/` instead.
    """
    overrides = command_line_overrides(argv)
    run_dir = overrides.get("hydra.run.dir")
    if (
        is_sweep(argv)
        or not resumes(overrides.get("ckpt_path"))
        or run_dir is None
        or "hydra.output_subdir" in overrides
    ):
        return []
    if not RunDir(run_dir).config.is_file():
        return []
    return [f"hydra.output_subdir=.hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"]
