"""`python -m transferlab.interpolate START FINETUNED --out DIR`: WiSE-FT (Wortsman et al. 2022).

START is a run whose backbone stayed the pretrained one (mode=linear_probe, frozen) or an LP-FT
run's probe state (`RUN/checkpoints/probe-lbfgs.ckpt`); FINETUNED a run of the same network whose
backbone trained from the same pretrained weights, on the same data. For each alpha the network
`(1 - alpha) * START + alpha * FINETUNED` (`methods.wise`) gets its BatchNorm statistics
re-estimated on the runs' own training images (`--no-bn-recompute`: the mixed statistics), and is
measured on their validation and test splits. The alpha is chosen on validation (`wise.RULE`);
the network at that alpha is written as a run dir that `predict`, `export`, `report` and
`TransferModule.load_from_checkpoint` read:

    DIR/checkpoints/best-wise.ckpt    the chosen network, with the transferlab record of a training run's
    DIR/interpolate.csv, .md, .png    val and test results per alpha
    DIR/metrics.json, run_info.json   the chosen alpha's results; both sources, the alphas, every result
    DIR/.hydra/config.yaml            FINETUNED's config with mode=wise_ft (its alpha, the sources)

Every refusal (runs that do not pair, a bad alpha, an existing --out) is one line before the data
is read; the run dir is owned while it is written (`store.lock`, command `interpolate`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import DictConfig, OmegaConf

from transferlab.cli.args import CommandLine, check_folder_writable, pick_device
from transferlab.store.files import write_atomically
from transferlab.store.lock import INTERPOLATE, check_owner, owned
from transferlab.store.rundir import (
    RunDir,
    checkpoint_file,
    read_checkpoint,
    read_json,
    read_yaml,
    trained_config,
    transferlab_record,
)
from transferlab.utils.errors import UserError, exit_with, first_line

if TYPE_CHECKING:
    import torch

    from transferlab.methods.mode_facts import Mode
    from transferlab.methods.wise import AlphaResult

#: 0, 0.1, ..., 1
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
#: the mode name the interpolated run records (report tables list it as an arm of its own)
MODE_NAME = "wise_ft"
#: data settings that change no image of any split (where the data lies, how it is batched, and
#: the training-time augmentation); `normalization` is compared as the mean/std the checkpoints
#: record, and the seeds as the few-shot seed they give (only a few-shot run draws with one)
DATA_MAY_DIFFER = (
    "root",
    "download",
    "num_workers",
    "batch_size",
    "eval_batch_size",
    "in_memory",
    "augment",
    "crop_padding",
    "cache_features",
    "normalization",
    "seed",
    "fewshot.seed",
)
#: the advice every "these runs do not pair" refusal ends with
PAIR_ADVICE = "WiSE-FT mixes two runs of one network, on the same data, from the same pretrained weights"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandLine(
        prog="python -m transferlab.interpolate",
        description=(
            "WiSE-FT (Wortsman et al. 2022): the weights (1 - alpha) * START + alpha * FINETUNED for each\n"
            "alpha, BatchNorm statistics re-estimated on the runs' training images, val and test accuracy\n"
            "per alpha, alpha chosen on val accuracy (then val loss, then the smaller alpha). START: a\n"
            "linear_probe or frozen run, or an lp_ft run's RUN/checkpoints/probe-lbfgs.ckpt; FINETUNED: a\n"
            "run of the same network whose backbone trained from the same weights, on the same data.\n"
            "Writes DIR as a run dir (checkpoints/best-wise.ckpt, metrics.json, interpolate.csv/.md/.png)."
        ),
        epilog=(
            "examples:\n"
            "  python -m transferlab.interpolate outputs/probe outputs/finetune --out outputs/wise\n"
            "  python -m transferlab.interpolate outputs/lpft/checkpoints/probe-lbfgs.ckpt outputs/lpft "
            "--out outputs/lpft_wise --alphas 0,0.25,0.5,0.75,1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "start",
        metavar="START",
        help="the run dir (its best checkpoint) or .ckpt of a linear_probe or frozen run, or an lp_ft run's "
        "checkpoints/probe-lbfgs.ckpt",
    )
    parser.add_argument(
        "finetuned",
        metavar="FINETUNED",
        help="the run dir (its best checkpoint) or .ckpt of a run whose backbone trained (finetune, lp_ft, ...)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="the run dir to write; an existing folder that holds anything is refused unless --force",
    )
    parser.add_argument(
        "--alphas",
        type=alpha_list,
        default=list(DEFAULT_ALPHAS),
        metavar="A,B,...",
        help="the weights of FINETUNED to try, numbers in [0, 1] separated by commas (default: 0,0.1,...,1)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into an existing --out (an earlier interpolation's files are replaced; the runs read are never touched)",
    )
    parser.add_argument(
        "--no-bn-recompute",
        dest="bn_recompute",
        action="store_false",
        help="keep the interpolated BatchNorm running statistics instead of re-estimating them on the training images",
    )
    parser.add_argument(
        "--no-corruptions",
        dest="corruptions",
        action="store_false",
        help="skip the corruption eval per alpha that FINETUNED's eval.* settings ask for (test_c/*)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the runs' dataset lies now (default: the data.root the runs recorded)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the networks run (default: auto, the GPU when there is one)",
    )
    return parser.parse_args(_alphas_joined(list(sys.argv[1:] if argv is None else argv)))


def _alphas_joined(argv: list[str]) -> list[str]:
    """`--alphas -0.1,1` as `--alphas=-0.1,1`: argparse takes a value that starts with `-` (and is not
    one number) for an option and would answer "expected one argument" instead of the range refusal."""
    joined, i = [], 0
    while i < len(argv):
        if (
            argv[i] == "--alphas"
            and i + 1 < len(argv)
            and argv[i + 1].startswith("-")
            and argv[i + 1] != "--"
        ):
            joined.append(f"--alphas={argv[i + 1]}")
            i += 2
            continue
        joined.append(argv[i])
        i += 1
    return joined


def alpha_list(text: str) -> list[float]:
    """`0,0.25,1` -> [0.0, 0.25, 1.0], sorted; refuses what is not a list of distinct numbers in [0, 1]."""
    example = "e.g. --alphas 0,0.25,0.5,0.75,1"
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or "" in parts:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds an empty entry; give numbers in [0, 1] separated by commas, {example}"
        )
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a number; give numbers in [0, 1] separated by commas, {example}"
            ) from None
        if not math.isfinite(value) or not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(
                f"{part} is outside [0, 1] (0: START's weights, 1: FINETUNED's); {example}"
            )
        values.append(value)
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(
            f"{', '.join(f'{v:g}' for v in twice)} is given twice; list each alpha once"
        )
    return sorted(values)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        interpolate(args)
    except UserError as error:
        exit_with(error)


# ---- the two runs ----------------------------------------------------------------------------
@dataclass
class Source:
    """START or FINETUNED, read from disk once: what the checks compare and the weights mixed."""

    role: str  # START, FINETUNED: the argument, as the refusals name it
    checkpoint: Path
    run_dir: Path | None  # the run dir the checkpoint lies in (RUN/checkpoints/x.ckpt), if it does
    file: dict  # the checkpoint as read (memory-mapped tensors)
    record: dict  # transferlab's record in it
    config: DictConfig  # the config the run trained with
    mode: "Mode"
    weights: str  # what the backbone started from (run_info.json's backbone_weights, else the config's)
    metrics: dict
    fewshot: list[int] | None  # the run's few-shot training images (fewshot_indices.json), if recorded
    probe_state: bool  # an LP-FT run's probe state (RUN/checkpoints/probe-lbfgs.ckpt)

    @property
    def state(self) -> dict:
        """The network's tensors (`backbone.*`, `head.*`)."""
        return {k: v for k, v in self.file["state_dict"].items() if str(k).startswith(("backbone.", "head."))}

    @property
    def name(self) -> str:
        return f"{self.role} {self.checkpoint}"

    @property
    def folder(self) -> Path:
        """What the command reads from and must never write into: the run dir, else the checkpoint's folder."""
        return self.run_dir or self.checkpoint.parent


def read_source(given: str, role: str) -> Source:
    file = checkpoint_file(given, setting=role)
    checkpoint = read_checkpoint(file, role)
    record = transferlab_record(checkpoint)
    if not record.get("architecture") or not (record.get("data") or {}).get("class_names"):
        raise UserError(
            f"{role}={file} is not a checkpoint of this transferlab version (it records no architecture or "
            f"classes); give the run dir or .ckpt of a run trained with it"
        )
    resolved = file.resolve()
    run_dir = resolved.parent.parent if resolved.parent.name == RunDir.CHECKPOINTS else None
    config = trained_config(file, record)
    if config is None or not isinstance(config.get("mode"), DictConfig) or "data" not in config:
        where = f" nor {RunDir(run_dir).config}" if run_dir else ""
        raise UserError(
            f"{role}={file} records no config (not in the checkpoint{where}); give a checkpoint of a run made "
            f"by python -m transferlab"
        )
    mode = recorded_mode(config, f"{role}={file}")
    run = RunDir(run_dir) if run_dir else None
    if run is not None and not run.metrics.is_file():
        # a run still training, or killed: its checkpoints are not the network it will stand for
        raise UserError(
            f"{role}={given}: its run {run_dir} has not finished (no metrics.json); finish it first "
            f"(python -m transferlab <its overrides> hydra.run.dir={run_dir} ckpt_path=last)"
        )
    info = run.read_run_info() if run else {}
    weights = info.get("backbone_weights") or configured_weights(config, mode)
    fewshot = read_json(run.fewshot_indices).get("indices") if run else None
    return Source(
        role=role,
        checkpoint=file,
        run_dir=run_dir,
        file=checkpoint,
        record=record,
        config=config,
        mode=mode,
        weights=str(weights),
        metrics=run.read_metrics() if run else {},
        fewshot=fewshot if isinstance(fewshot, list) else None,
        probe_state=run is not None and resolved == run.probe_state.resolve(),
    )


def recorded_mode(config: DictConfig, what: str) -> "Mode":
    """The facts of the mode a run recorded (`methods.mode_facts.mode_facts`); a config from before the
    facts were stated gets those of its built-in mode."""
    from transferlab.methods.mode_facts import facts_before_they_were_stated, mode_facts

    try:
        node = OmegaConf.to_container(config.mode, resolve=True)
    except Exception as error:
        raise UserError(f"{what}: its recorded mode cannot be read ({first_line(error)})") from None
    facts = {"pretrained": True, "train_bn": False, **facts_before_they_were_stated(node.get("name")), **node}
    try:
        return mode_facts(facts)
    except UserError as error:
        raise UserError(f"{what}: its recorded mode: {error}") from None


def configured_weights(config: DictConfig, mode: "Mode") -> str:
    """What the backbone started from, by the config alone (a run without run_info.json: killed, or older)."""
    from transferlab.models.weights import wants_weights

    weights = OmegaConf.select(config, "backbone.weights", default=None, throw_on_resolution_failure=False)
    return (
        "random init" if not mode.pretrained or not wants_weights(weights) else f"backbone.weights={weights}"
    )


# ---- the checks, before anything is built ------------------------------------------------------
def check_out(out: Path, force: bool, sources: Sequence[Source]) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the interpolation's run dir")
    for source in sources:
        if (
            source.run_dir is None
        ):  # a checkpoint file of its own: only its folder and the file are off limits
            if out.resolve() in (source.checkpoint.resolve(), source.folder.resolve()):
                raise UserError(
                    f"--out {out} is the folder that holds {source.role}'s checkpoint {source.checkpoint}, which "
                    "this command reads; choose another --out (a new folder)"
                )
            continue
        if _within(out, source.folder):
            raise UserError(
                f"--out {out} is {'' if out.resolve() == source.folder.resolve() else 'inside '}the {source.role} "
                f"run {source.folder}, which this command reads (even --force never writes there); choose another --out"
            )
        if _within(source.folder, out):
            raise UserError(
                f"--out {out} holds the {source.role} run {source.folder}, which this command reads; choose a folder "
                "of its own for --out"
            )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out {out} already exists and is not empty; choose another --out, or add --force to replace an "
            "earlier interpolation's files in it"
        )
    check_folder_writable(RunDir(out).metrics, "--out")
    check_owner(out, INTERPOLATE, setting="--out")  # another command writing it, or another kind's folder


def _within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_pair(start: Source, finetuned: Source, data_root_given: bool) -> list[str]:
    """Refuse two runs that WiSE-FT cannot mix; returns the warnings about a pair it can."""
    if finetuned.probe_state:
        # an lp_ft run dir given as FINETUNED whose best checkpoint is still its probe state (no epoch beat it)
        raise UserError(
            f"FINETUNED={finetuned.checkpoint} is an lp_ft run's probe state, from before any fine-tuning epoch "
            f"(no epoch beat its val/acc, so it is the run's best checkpoint); give "
            f"{finetuned.checkpoint.parent / RunDir.LAST} for the fine-tuned network"
        )
    if start.checkpoint.resolve() == finetuned.checkpoint.resolve():
        raise UserError(
            f"START and FINETUNED are the same checkpoint {start.checkpoint}; give a probe and a fine-tuned run"
        )
    for source in (start, finetuned):
        if not source.mode.pretrained:
            raise UserError(
                f"{source.role}={source.checkpoint} is a mode={source.mode.name} run (random init): it shares no "
                f"pretrained start with the other run; {PAIR_ADVICE}"
            )
    if not (start.mode.backbone_fixed or start.probe_state):
        probe = RunDir(start.run_dir).probe_state if start.run_dir else None
        hint = (
            f"its probe state {probe}"
            if probe is not None and start.mode.head_solve == "before_fit" and probe.is_file()
            else "a linear_probe or frozen run"
        )
        raise UserError(
            f"START={start.checkpoint} is a mode={start.mode.name} checkpoint whose backbone trained; START must keep "
            f"the pretrained backbone (mode=linear_probe, frozen, or an lp_ft run's probe state): give {hint}"
        )
    if finetuned.mode.backbone_fixed:
        raise UserError(
            f"FINETUNED={finetuned.checkpoint} is a mode={finetuned.mode.name} run: its backbone never trained, so "
            "there is nothing to interpolate towards; give a run whose backbone trained (finetune, lp_ft, partial, ...)"
        )
    if finetuned.probe_state:
        raise UserError(
            f"FINETUNED={finetuned.checkpoint} is an lp_ft run's probe state (before any fine-tuning; the run's best "
            f"when no epoch beat it): give one of its fine-tuned checkpoints, e.g. "
            f"{RunDir(finetuned.run_dir).last}"
        )
    differences = [
        ("the network", architecture_difference(start.record, finetuned.record)),
        (
            "classes",
            _difference(start.record["data"]["class_names"], finetuned.record["data"]["class_names"]),
        ),
        ("preprocessing", preprocessing_difference(start.record["data"], finetuned.record["data"])),
        ("pretrained weights", weights_difference(start, finetuned)),
        ("data", data_difference(start, finetuned, data_root_given)),
    ]
    from transferlab.callbacks.guards import state_dict_difference

    differences.append(("weights' shapes", state_dict_difference(start.state, finetuned.state)))
    for what, difference in differences:
        if difference:
            raise UserError(
                f"{start.name} and {finetuned.name} differ in {what} ({difference}); {PAIR_ADVICE}"
            )
    if not head_started_from(start, finetuned):
        why = (
            "its head started from random init"
            if not finetuned.mode.solves_head
            else "its own probe's head differs from START's"
        )
        warning = (
            f"FINETUNED's head did not start from START's (mode={finetuned.mode.name}: {why}); the mixed heads "
            f"average two unrelated solutions, where WiSE-FT assumes a fine-tuned run that started from START "
            f"(an lp_ft run and its {RunDir.CHECKPOINTS}/{RunDir.PROBE_STATE})"
        )
        return [warning]
    return []


def _difference(a: Any, b: Any, key: str = "") -> str | None:
    if a == b:
        return None
    return f"{key + ': ' if key else ''}{_shown(a)} vs {_shown(b)}"


def _shown(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first dotted key whose values differ between two trees, as `key: a vs b`."""
    from transferlab.config import dotted_settings

    flat_a, flat_b = dotted_settings(a, prefix), dotted_settings(b, prefix)
    for key in sorted(set(flat_a) | set(flat_b)):
        difference = _difference(flat_a.get(key, "(not set)"), flat_b.get(key, "(not set)"), key)
        if difference:
            return difference
    return None


def architecture_difference(a: dict, b: dict) -> str | None:
    """The backbone and head the checkpoints record (`models.architecture`), key by key."""
    parts = ("backbone", "head", "backbone_attributes")
    return _first_difference(
        {part: a["architecture"].get(part) or {} for part in parts},
        {part: b["architecture"].get(part) or {} for part in parts},
    )


def preprocessing_difference(a: dict, b: dict) -> str | None:
    if int(a.get("image_size", 0)) != int(b.get("image_size", 0)):
        return f"image size {a.get('image_size')} vs {b.get('image_size')}"
    for key in ("mean", "std"):
        x, y = [float(v) for v in a.get(key) or ()], [float(v) for v in b.get(key) or ()]
        if len(x) != len(y) or any(abs(u - v) > 1e-6 for u, v in zip(x, y)):
            return f"normalization {key} {x} vs {y}"
    return None


def weights_difference(start: Source, finetuned: Source) -> str | None:
    if start.weights != finetuned.weights:
        return f"backbone weights {start.weights} vs {finetuned.weights}"
    if start.weights == "random init":
        return "both backbones started from random init: no pretrained start"
    return None


def resolved_data(source: Source) -> dict:
    try:
        data = OmegaConf.to_container(source.config.data, resolve=True)
    except Exception as error:
        raise UserError(
            f"{source.role}={source.checkpoint}: its recorded data config cannot be resolved ({first_line(error)})"
        ) from None
    return data


def fewshot_seed(data: dict) -> Any:
    """The seed a few-shot run draws its training images with; None for a run that uses them all."""
    fewshot = data.get("fewshot") or {}
    if fewshot.get("per_class") is None and fewshot.get("fraction") is None:
        return None
    return data.get("seed") if fewshot.get("seed") is None else fewshot.get("seed")


def data_difference(start: Source, finetuned: Source, data_root_given: bool) -> str | None:
    """The dataset, its classes, splits and few-shot images: those of the two runs must be the same."""
    a, b = resolved_data(start), resolved_data(finetuned)
    if start.record["data"].get("dataset") != finetuned.record["data"].get("dataset"):
        return f"dataset {start.record['data'].get('dataset')} vs {finetuned.record['data'].get('dataset')}"
    difference = _first_difference(_without(a, DATA_MAY_DIFFER), _without(b, DATA_MAY_DIFFER), "data.")
    if difference:
        return difference
    if fewshot_seed(a) != fewshot_seed(b):
        return f"the few-shot seed: {fewshot_seed(a)} vs {fewshot_seed(b)}"
    if not data_root_given:
        roots = [Path(str(d.get("root"))).expanduser().resolve() for d in (a, b)]
        if roots[0] != roots[1]:
            return f"data.root {a.get('root')} vs {b.get('root')} (give --data-root if they hold the same dataset)"
    if start.fewshot is not None and finetuned.fewshot is not None and start.fewshot != finetuned.fewshot:
        return f"the few-shot training images their {RunDir.FEWSHOT_INDICES} record"
    return None


def _without(data: dict, keys: Sequence[str]) -> dict:
    """`data` without the dotted `keys` (one level of nesting: `fewshot.seed`)."""
    kept = {k: v for k, v in data.items() if k not in keys}
    for key in keys:
        group, _, name = key.partition(".")
        if name and isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k != name}
    return kept


def head_started_from(start: Source, finetuned: Source) -> bool:
    """FINETUNED's head started from START's: START is FINETUNED's own probe state, or FINETUNED's probe
    state (an lp_ft run's) holds START's head tensor for tensor."""
    if finetuned.run_dir is None or not RunDir(finetuned.run_dir).probe_state.is_file():
        return False
    probe = RunDir(finetuned.run_dir).probe_state
    if probe.resolve() == start.checkpoint.resolve():
        return True
    import torch

    tuned_start = read_checkpoint(probe, "FINETUNED")["state_dict"]
    heads = [k for k in start.state if k.startswith("head.")]
    return all(k in tuned_start and torch.equal(tuned_start[k], start.state[k]) for k in heads)


# ---- the data --------------------------------------------------------------------------------
def data_config(finetuned: Source, data_root: Path | None) -> dict:
    """FINETUNED's data settings (the checks made them START's too), reading from `data_root` if
    given, never downloading."""
    data = resolved_data(finetuned)
    if data_root is not None:
        data["root"] = str(data_root)
    data["download"] = False
    return data


def build_data(data: dict, recorded: dict):
    """The runs' data module, read and split as they were: the same classes, validation split and
    few-shot images, with the mean/std their checkpoints record (the runs' own normalization)."""
    import hydra

    from transferlab.utils.errors import bad_argument

    weights = {
        "source": "the runs' checkpoints",
        "name": recorded.get("normalization"),
        "mean": recorded["mean"],
        "std": recorded["std"],
    }
    try:
        datamodule = hydra.utils.instantiate(
            {**data, "normalization": None}, output_dir=None, weights=weights
        )
        datamodule.prepare_data()
        datamodule.setup("fit")
    except Exception as error:
        refusal = bad_argument("data", error)
        if refusal is None:
            raise
        raise in_interpolate_terms(refusal) from None
    return datamodule


def in_interpolate_terms(refusal: UserError) -> UserError:
    """A data refusal with the fix this command takes: its advice names `data.*` settings (set
    data.download=true, point data.root at ...), which interpolate has no way to give."""
    what, _, advice = str(refusal).rpartition("; ")
    if not what or "data." not in advice:
        return refusal
    return UserError(
        f"the runs' data cannot be read ({what}); give --data-root the folder that holds their dataset "
        "(interpolate never downloads)"
    )


def check_images(datamodule, data: dict, sources: Sequence[Source]) -> None:
    """The data read now gives the runs' classes and few-shot training images."""
    recorded = sources[0].record["data"]["class_names"]
    if list(datamodule.class_names) != list(recorded):
        raise UserError(
            f"the data at data.root={data['root']} has the classes {_shown(datamodule.class_names)}, the runs "
            f"trained on {_shown(recorded)}; give --data-root the folder the runs read"
        )
    positions = datamodule.train.positions.tolist()
    for source in sources:
        if source.fewshot is not None and positions != source.fewshot:
            raise UserError(
                f"the data at data.root={data['root']} gives other few-shot training images than {source.role}'s "
                f"{RunDir(source.run_dir).fewshot_indices} records; give --data-root the folder the runs read"
            )


# ---- the command -----------------------------------------------------------------------------
def interpolate(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    start = read_source(args.start, "START")
    finetuned = read_source(args.finetuned, "FINETUNED")
    check_out(args.out, args.force, (start, finetuned))
    warnings = check_pair(start, finetuned, data_root_given=args.data_root is not None)
    data = data_config(finetuned, args.data_root)
    from transferlab.data.datamodule import check_data_root  # heavy: Lightning (loaded by the checks already)

    try:
        check_data_root(OmegaConf.create(data))
    except UserError as refusal:
        raise in_interpolate_terms(refusal) from None
    device = pick_device(args.device)
    # Reads the data and the runs' network: what cannot be read is refused before --out is made
    # and before the warnings, which describe a mix that will then be made.
    run = Interpolation(start, finetuned, data, device, args.bn_recompute, args.corruptions)
    for warning in warnings:
        warn(warning)
    with owned(args.out, INTERPOLATE, setting="--out"):
        RunDir(args.out).metrics.unlink(
            missing_ok=True
        )  # an earlier interpolation's (--force): until this one ends
        results = run.sweep(args.alphas)
        chosen = run.chosen
        print(
            f"chosen alpha {chosen.alpha:g} (val acc {chosen.val.accuracy:.4f}, test acc "
            f"{chosen.test.accuracy:.4f}): {RunDir(args.out).wise}"
        )
        write_run(args.out, run, results, time.perf_counter() - started)


def warn(message: str) -> None:
    print(f"transferlab: warning: {message}", file=sys.stderr, flush=True)


class Interpolation:
    """The runs' network and data, ready; `sweep` measures each alpha and keeps the chosen network."""

    def __init__(
        self,
        start: Source,
        finetuned: Source,
        data: dict,
        device: "torch.device",
        bn_recompute: bool,
        corruptions: bool = True,
    ):
        from transferlab.models import TransferModule  # heavy: Lightning
        from transferlab.utils.quietlogs import quiet_third_party

        quiet_third_party()
        self.start, self.finetuned, self.data, self.device = start, finetuned, data, device
        self.datamodule = build_data(data, finetuned.record["data"])
        check_images(self.datamodule, data, (start, finetuned))
        from transferlab.run.robustness import check_eval_fits, eval_settings

        # FINETUNED's corruption eval, per alpha: the same pairs, subset and seed, so that the curve's
        # ends compare with the runs' own test_c/acc
        eval_node = finetuned.config.get("eval") if corruptions else None
        self.corruptions = eval_settings(eval_node)
        check_eval_fits(eval_node, self.datamodule)
        # FINETUNED's calibration.temperature=auto: a temperature fitted on validation for the chosen alpha
        from transferlab.run.calibration import fits_temperature

        self.calibrate = fits_temperature(finetuned.config.get("calibration"))
        # FINETUNED's network, rebuilt from its record; each alpha loads its weights into it
        self.model = TransferModule.load_from_checkpoint(finetuned.checkpoint, map_location="cpu").to(device)
        self.model.temperature = None  # fitted for FINETUNED's weights, not for a mix
        from transferlab.methods.wise import batchnorms, differing_batchnorms

        self.states = [{k: v.to(device) for k, v in source.state.items()} for source in (start, finetuned)]
        self.bn_recompute = bn_recompute
        self.bn_layers = len(batchnorms(self.model))
        # where the two runs' statistics differ; each is re-estimated for 0 < alpha < 1
        self.stale = differing_batchnorms(self.model, *self.states) if bn_recompute else []
        self.bn_images = 0
        self.alphas: list[float] = []
        self.chosen: AlphaResult | None = None
        self.chosen_state: dict | None = None

    def prepare(self, images: "torch.Tensor") -> "torch.Tensor":
        return self.datamodule.preprocess(images, train=False)  # what validation and test batches get

    def describe(self) -> str:
        """What happens to the BatchNorm statistics, in words."""
        if not self.bn_layers:
            return "BatchNorm statistics: none (the network has no BatchNorm layer)"
        if not self.bn_recompute:
            return "BatchNorm statistics: interpolated (--no-bn-recompute)"
        if not self.stale:
            return "BatchNorm statistics: the runs' own (the same in both: nothing to re-estimate)"
        return (
            f"BatchNorm statistics: re-estimated for 0 < alpha < 1 on the {len(self.datamodule.train)} training "
            f"images, in the {len(self.stale)} of {self.bn_layers} BatchNorm layers whose statistics differ "
            f"between the runs (alpha 0 and 1: the runs as trained)"
        )

    def sweep(self, alphas: Sequence[float]) -> list["AlphaResult"]:
        from transferlab.methods.wise import (
            AlphaResult,
            batches,
            evaluate,
            interpolated,
            rank_key,
            recompute_batchnorm,
        )

        dm, batch_size = self.datamodule, self.datamodule.eval_batch_size
        self.alphas = list(alphas)
        print(
            f"WiSE-FT: {len(alphas)} alphas between START ({self.start.mode.name}, {self.start.checkpoint}) and "
            f"FINETUNED ({self.finetuned.mode.name}, {self.finetuned.checkpoint}); {self.describe()}",
            flush=True,
        )
        results = []
        for alpha in alphas:
            self.load(interpolated(*self.states, alpha))
            if self.stale and 0 < alpha < 1:
                train = (images for images, _ in batches(dm.train, dm.batch_size, drop_single=True))
                self.bn_images = recompute_batchnorm(self.model, train, self.prepare, self.stale)
            result = AlphaResult(
                alpha,
                evaluate(self.model, batches(dm.val, batch_size), self.prepare),
                evaluate(self.model, batches(dm.test, batch_size), self.prepare),
                self.corrupted() if self.corruptions else {},
            )
            results.append(result)
            if self.chosen is None or rank_key(result) < rank_key(self.chosen):
                self.chosen = result
                self.chosen_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            corrupted = f"  test_c/acc {result.test_c['test_c/acc']:.4f}" if result.test_c else ""
            print(
                f"alpha {alpha:<5g} val acc {result.val.accuracy:.4f}  test acc {result.test.accuracy:.4f}{corrupted}",
                flush=True,
            )
        self.model.load_state_dict(self.chosen_state)
        return results

    def corrupted(self) -> dict[str, float]:
        """The network as it is now on the corrupted test subset (`run.robustness`'s test_c/* metrics)."""
        from transferlab.data.features import feature_cache_on
        from transferlab.data.subsets import Split
        from transferlab.methods.wise import batches, evaluate
        from transferlab.run.robustness import corruption_metrics, eval_subset

        test = eval_subset(self.corruptions, self.datamodule.test_images)
        batch_size = self.datamodule.eval_batch_size
        use_disk = feature_cache_on(self.data)

        def accuracy(images: "torch.Tensor") -> float:
            split = Split(images, test.labels, test.positions)
            return evaluate(self.model, batches(split, batch_size), self.prepare).accuracy

        return corruption_metrics(self.corruptions, test, accuracy, use_disk)

    def temperature(self) -> float | None:
        """The chosen alpha's temperature, fitted on its validation logits (FINETUNED calibrated: auto)."""
        if not self.calibrate:
            return None
        from transferlab.models.calibration import fit_temperature

        return fit_temperature(self.chosen.val.logits, self.chosen.val.labels)

    def load(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        network = [k for k in missing if k.startswith(("backbone.", "head."))]
        if network or unexpected:  # the checks compared the tensors: a bug if it happens
            raise RuntimeError(f"interpolated weights do not fit the network: {(network + unexpected)[:3]}")


# ---- what the run dir holds ------------------------------------------------------------------
def write_run(out: Path, run: Interpolation, results: list["AlphaResult"], seconds: float) -> None:
    """Checkpoint, tables, figure, config and records; metrics.json last (it says the run is complete)."""
    import lightning
    import torch

    from transferlab.models.calibration import calibration_measures
    from transferlab.run.provenance import run_info

    folder = RunDir(out)
    chosen, start, finetuned = run.chosen, run.start, run.finetuned
    config = wise_config(run, out)
    wise = {
        "alpha": chosen.alpha,
        "start": str(start.checkpoint.resolve()),
        "finetuned": str(finetuned.checkpoint.resolve()),
        "bn_recompute": run.bn_recompute,
    }
    checkpoint = {
        "epoch": finetuned.file.get("epoch", 0),
        "global_step": finetuned.file.get("global_step", 0),
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": run.chosen_state,
        # a training run's record (FINETUNED's: the same network, data and preprocessing), uncalibrated
        "transferlab": {
            **finetuned.record,
            "temperature": None,
            "config": OmegaConf.to_container(config),
            "wise_ft": wise,
        },
    }
    temperature = run.temperature()
    checkpoint["transferlab"]["temperature"] = temperature  # predict and export apply it
    write(folder.wise, lambda f: torch.save(checkpoint, f))
    calibration = [calibration_measures(r.test.logits, r.test.labels) for r in results]
    rows = [{**r.row(), "test/ece": c["ece"], "chosen": r is chosen} for r, c in zip(results, calibration)]
    write(folder.interpolate_csv, lambda f: f.write(csv_text(rows).encode()))
    write(folder.interpolate_md, lambda f: f.write(markdown(rows, run).encode()))
    corrupted = [r.test_c["test_c/acc"] for r in results] if run.corruptions else None
    draw(results, chosen, f"WiSE-FT: {start.mode.name} -> {finetuned.mode.name}", corrupted).savefig(
        folder.interpolate_png, dpi=110
    )
    _close_figures()
    write(folder.config, lambda f: f.write(OmegaConf.to_yaml(config).encode()))
    write(folder.overrides, lambda f: f.write(OmegaConf.to_yaml(overrides(finetuned, chosen.alpha)).encode()))
    if finetuned.run_dir is not None and RunDir(finetuned.run_dir).fewshot_indices.is_file():
        text = RunDir(finetuned.run_dir).fewshot_indices.read_bytes()  # the same training images
        write(folder.fewshot_indices, lambda f: f.write(text))
    info = {
        **run_info(config),
        "command": " ".join(["python -m transferlab.interpolate", *sys.argv[1:]]),
        "backbone_weights": finetuned.weights,
        "start": _described(start),
        "finetuned": _described(finetuned),
        "alphas": [r.alpha for r in results],
        "alpha": chosen.alpha,
        "rule": _rule(),
        "bn_recompute": run.bn_recompute,
        "bn_images": run.bn_images,
        "bn_layers": run.bn_layers,
        "bn_layers_recomputed": len(run.stale),
        "head_started_from_start": head_started_from(start, finetuned),
        "eval": run.corruptions.record() if run.corruptions else None,
        "temperature": temperature,
        "results": [{k: v for k, v in row.items() if k != "chosen"} for row in rows],
    }
    write(folder.run_info, lambda f: f.write(json.dumps(info, indent=2).encode() + b"\n"))
    chosen_calibration = calibration[results.index(chosen)]
    metrics = {
        **chosen.row(),
        "val/acc_best": chosen.val.accuracy,
        "test/nll": chosen_calibration["nll"],
        "test/ece": chosen_calibration["ece"],
        "test/brier": chosen_calibration["brier"],
        "test/acc_per_class": accuracy_per_class(chosen.test, finetuned.record["data"]["class_names"]),
        "test/images": chosen.test.images,
        **chosen.test_c,
        **calibrated(chosen, temperature),
        "best_checkpoint": folder.wise.relative_to(folder.path).as_posix(),
        **cost(start, finetuned, seconds),
    }
    write(folder.metrics, lambda f: f.write(json.dumps(metrics, indent=2, sort_keys=True).encode() + b"\n"))
    print(f"results per alpha in {folder.interpolate_csv}, {folder.interpolate_md}, {folder.interpolate_png}")


def calibrated(chosen: "AlphaResult", temperature: float | None) -> dict:
    """The chosen alpha's calibrated test metrics (as a training run with calibration=auto writes them)."""
    if temperature is None:
        return {}
    from transferlab.models.calibration import calibration_measures

    measures = calibration_measures(chosen.test.logits, chosen.test.labels, temperature)
    return {"temperature": temperature, **{f"test/{k}_calibrated": v for k, v in measures.items()}}


def write(path: Path, writer) -> None:
    try:
        write_atomically(path, writer)
    except OSError as error:
        raise UserError(
            f"cannot write {path} ({error.strerror or type(error).__name__}); choose another --out"
        ) from None


def wise_config(run: Interpolation, out: Path) -> DictConfig:
    """FINETUNED's config, saying what this run is: mode wise_ft with its alpha and sources, the data
    where it was read, uncalibrated."""
    config = OmegaConf.to_container(run.finetuned.config, resolve=False)
    config.update(task_name="interpolate", ckpt_path=None, label=None)
    config["data"] = {**config["data"], "root": run.data["root"]}
    config["paths"] = {**(config.get("paths") or {}), "output_dir": str(out.resolve())}
    if isinstance(config.get("calibration"), dict) and not run.calibrate:
        config["calibration"] = {**config["calibration"], "temperature": "none"}
    if not run.corruptions and isinstance(config.get("eval"), dict):
        config["eval"] = {**config["eval"], "corruptions": []}  # --no-corruptions
    config["mode"] = {
        "name": MODE_NAME,
        "pretrained": True,
        "backbone_fixed": False,
        "head_solve": "none",
        "train_bn": run.finetuned.mode.train_bn,
        "alpha": run.chosen.alpha,
        "alphas": list(run.alphas),
        "bn_recompute": run.bn_recompute,
        "start": str(run.start.checkpoint.resolve()),
        "finetuned": str(run.finetuned.checkpoint.resolve()),
    }
    return OmegaConf.create(config)


def overrides(finetuned: Source, alpha: float) -> list[str]:
    """FINETUNED's command-line overrides with mode=wise_ft and its alpha (report tables name runs by them)."""
    saved = read_yaml(RunDir(finetuned.run_dir).overrides) if finetuned.run_dir else None
    kept = [
        str(o)
        for o in (saved or [])
        if str(o).lstrip("+~").split("=")[0].split(".")[0]
        not in ("mode", "ckpt_path", "label", "hydra", "calibration")
    ]
    return [*kept, f"mode={MODE_NAME}", f"mode.alpha={alpha:g}"]


def _described(source: Source) -> dict:
    return {
        "checkpoint": str(source.checkpoint.resolve()),
        "run_dir": str(source.run_dir) if source.run_dir else None,
        "mode": source.mode.name,
        "probe_state": source.probe_state,
        "backbone_weights": source.weights,
        "test/acc": source.metrics.get("test/acc"),
        "val/acc_best": source.metrics.get("val/acc_best"),
    }


def _rule() -> str:
    from transferlab.methods.wise import RULE

    return RULE


def cost(start: Source, finetuned: Source, seconds: float) -> dict:
    """The run's cost as a report shows it: the two runs' training and features (START once: an lp_ft
    run's probe state is part of its own run) plus this command's time (`interpolate_time_s`)."""
    counted = [finetuned] if start.run_dir == finetuned.run_dir else [start, finetuned]
    total = {
        key: sum(float(s.metrics.get(key) or 0.0) for s in counted)
        for key in ("train_time_s", "features_time_s")
    }
    return {
        "train_time_s": round(total["train_time_s"] + seconds, 3),
        "features_time_s": round(total["features_time_s"], 3),
        "interpolate_time_s": round(seconds, 3),
        "epochs": finetuned.metrics.get("epochs", 0),
        "params_total": finetuned.metrics.get("params_total"),
        "params_trainable": finetuned.metrics.get("params_trainable"),
    }


def accuracy_per_class(scores, class_names: list[str]) -> dict[str, float | None]:
    predicted = scores.logits.argmax(dim=1)
    shares = {}
    for index, name in enumerate(class_names):
        members = scores.labels == index
        count = int(members.sum())
        shares[str(name)] = float((predicted[members] == index).sum()) / count if count else None
    return shares


# ---- tables and the figure ---------------------------------------------------------------------
COLUMNS = ("alpha", "val/acc", "val/loss", "test/acc", "test/loss", "test/ece")
CORRUPTED_COLUMN = "test_c/acc"  # when the corruptions were evaluated


def columns(rows: list[dict]) -> tuple[str, ...]:
    return COLUMNS + ((CORRUPTED_COLUMN,) if CORRUPTED_COLUMN in rows[0] else ())


def csv_text(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    shown = columns(rows)
    writer.writerow([*shown, "chosen"])
    for row in rows:
        writer.writerow(
            [f"{row['alpha']:g}", *(f"{row[c]:.6f}" for c in shown[1:]), str(row["chosen"]).lower()]
        )
    return text.getvalue()


def markdown(rows: list[dict], run: Interpolation) -> str:
    lines = [
        "# WiSE-FT: weight-space interpolation",
        "",
        f"- START (alpha 0): `{run.start.checkpoint}` (mode={run.start.mode.name})",
        f"- FINETUNED (alpha 1): `{run.finetuned.checkpoint}` (mode={run.finetuned.mode.name})",
        f"- {run.describe()}",
        f"- alpha chosen on validation: {_rule()}; the test takes no part in the choice",
        *([f"- {CORRUPTED_COLUMN}: {_corruptions_described(run.corruptions)}"] if run.corruptions else []),
        "",
        "| " + " | ".join(columns(rows)) + " |",
        "|" + "---|" * len(columns(rows)),
    ]
    for row in rows:
        cells = [f"{row['alpha']:g}", *(f"{row[c]:.4f}" for c in columns(rows)[1:])]
        if row["chosen"]:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = next(row for row in rows if row["chosen"])
    lines += ["", f"Chosen: alpha {chosen['alpha']:g} (bold), `checkpoints/{RunDir.WISE}`.", ""]
    return "\n".join(lines)


def _corruptions_described(settings) -> str:
    subset = f"{settings.images} test images" if settings.images else "the whole test split"
    return (
        f"mean accuracy over {', '.join(settings.corruptions)} at severities "
        f"{', '.join(map(str, settings.severities))} (CIFAR-10-C-style, eval.seed={settings.seed}) on {subset}"
    )


def draw(
    results: list["AlphaResult"], chosen: "AlphaResult", title: str, corrupted: list[float] | None = None
):
    """Validation and test accuracy over alpha, the chosen alpha marked. `corrupted`: the corrupted
    test accuracy per alpha (test_c/acc, mean over corruptions), drawn when given: the place for the
    corruption eval's curve."""
    # heavy: matplotlib, only when a figure is drawn; the Agg backend is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    alphas = [r.alpha for r in results]
    figure, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    ax.plot(alphas, [r.val.accuracy for r in results], marker="o", label="validation")
    ax.plot(alphas, [r.test.accuracy for r in results], marker="s", label="test")
    if corrupted is not None:
        ax.plot(alphas, corrupted, marker="^", linestyle="--", label="corrupted test (test_c)")
    ax.axvline(chosen.alpha, color="grey", linestyle=":", label=f"chosen alpha {chosen.alpha:g}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("alpha (0: START, 1: FINETUNED)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def _close_figures() -> None:
    import matplotlib.pyplot as plt

    plt.close("all")


if __name__ == "__main__":
    main(sys.argv[1:])
