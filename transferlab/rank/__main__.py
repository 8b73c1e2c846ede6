"""`python -m transferlab.rank`: rank pretrained backbones for a target dataset before fine-tuning any.

    python -m transferlab.rank 'rank.backbones=[efficientnet_lite0,efficientnet_lite1]' data.fewshot.per_class=50

For each backbone (an option of the `backbone` config group, built as `backbone=NAME` builds it,
with the normalization its weights expect), the features of the target's training set (from
the feature cache, `transferlab.data.features`) are scored with LogME and H-score, and the source
model's predictions with LEEP and NCE where its classifier is known (`transferlab.rank.source`).
Writes `rank.csv` and `rank.md` into the run dir and prints the table.

Two phases, so that bad input costs nothing: every backbone and the data are built and
checked first, and only then are features computed.
"""

from __future__ import annotations

import difflib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from transferlab.config import check_mappings, check_numbers, check_seed, config_dir
from transferlab.rank import scores
from transferlab.rank.table import SCORES, print_table, write_tables
from transferlab.utils.errors import (
    UserError,
    bad_argument,
    full_tracebacks_when_debugging,
    user_errors_as_one_line,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("transferlab.rank")

CONFIG_NAME = "rank"
#: the run's own files: a run dir that holds them already is never written into again
OUTPUT_FILES = ("rank.csv", "rank.md")
DEVICES = ("auto", "cpu", "cuda")


def main() -> None:
    full_tracebacks_when_debugging()
    with user_errors_as_one_line():
        # Before Hydra: it writes .hydra/ into the run dir before the job could refuse anything.
        check_command_line(sys.argv[1:])
    from transferlab.cli.overrides import run_dir_owned_before_hydra  # loaded already by the checks
    from transferlab.store.lock import RANK

    with run_dir_owned_before_hydra(sys.argv[1:], RANK):  # the run dir's one owner (store.lock)
        hydra_main()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> None:
    from transferlab.store.lock import RANK, owned  # heavy: torch (store.rundir); see check_command_line

    # Owned since before Hydra when hydra.run.dir is on the command line (the same lock); the
    # default run dir from here on.
    with user_errors_as_one_line(), owned(cfg.paths.output_dir, RANK):
        run(cfg)


# ---- before Hydra ---------------------------------------------------------------------------
def check_command_line(argv: Sequence[str]) -> None:
    """The overrides compose, name known backbones, and the run dir can take a new ranking."""
    # heavy: cli.overrides imports run.resume, hence torch and Lightning; importing this module stays quick
    from transferlab.cli import overrides as cl
    from transferlab.store.lock import RANK, check_owner

    cl.check_flags_before_overrides(argv)
    if cl.NO_JOB_FLAGS.intersection(argv):
        return
    if cl.is_sweep(argv):
        raise UserError(
            "python -m transferlab.rank runs one ranking per command (no -m); it ranks several backbones at once "
            "with 'rank.backbones=[a,b,c]', and other settings take one command each"
        )
    _check_backbones_is_a_list(argv)
    cl.check_overrides_compose(["--config-name", CONFIG_NAME, *argv])  # composes the rank config, not train
    try:
        cfg = cl.compose(CONFIG_NAME, _overrides(argv))
    except MissingConfigException:
        return  # data=foo: Hydra's own message lists the choices
    for entry in backbone_entries(cfg.rank.get("backbones")):
        with_settings(entry, cl.compose("train", [f"backbone={entry.option}"]).backbone)
    check_settings(cfg)
    run_dir = cl.command_line_overrides(argv).get("hydra.run.dir")
    if run_dir is None:
        cl._check_default_outputs_writable()
    elif "${" not in run_dir:  # an interpolation is only known once Hydra resolves it
        if Path(run_dir).is_dir():
            check_owner(Path(run_dir), RANK)  # another command writing it, or a training run's folder
        check_run_dir(Path(run_dir))
        cl._check_creatable(Path(run_dir), "hydra.run.dir")
    from transferlab.data.datamodule import check_data_root  # last: it imports Lightning (seconds)

    check_data_root(cfg.data)  # a data.root that holds something else: refused before Hydra makes a run dir


def _overrides(argv: Sequence[str]) -> list[str]:
    from transferlab.cli.overrides import hydra_args_parser  # heavy: loads torch and Lightning (see above)

    return list(hydra_args_parser().parse_args(list(argv)).overrides)


def _check_backbones_is_a_list(argv: Sequence[str]) -> None:
    """`rank.backbones=a,b` is a sweep in Hydra's grammar; say how to write the list instead."""
    parser = OverridesParser.create()
    for text in _overrides(argv):
        if text.split("=", 1)[0].lstrip("+") != "rank.backbones":
            continue
        try:
            override = parser.parse_overrides([text])[0]
        except Exception:
            return  # a grammar error: check_overrides_compose's message
        if override.is_sweep_override():
            raise UserError(
                f"{text} is not a list; write the backbones in brackets, quoted for the shell: 'rank.backbones=[a,b]'"
            )


@dataclass(frozen=True)
class Entry:
    """One backbone to rank: a conf/backbone option, settings of its own, and the name its row gets."""

    label: str
    option: str
    settings: dict


def backbone_entries(value: Any) -> list[Entry]:
    """`rank.backbones` as entries: a list of backbone group options (one name is a list of one), where an
    entry may be a mapping `{backbone: OPTION, label: NAME, <backbone setting>: VALUE, ...}`, e.g. a network
    from an earlier run: `{backbone: vgg_blocks, weights: outputs/animals, label: animals}`."""
    if isinstance(value, (str, DictConfig, dict)):
        value = [value]
    if not isinstance(value, (list, ListConfig)) or len(value) == 0:
        raise UserError(
            f"rank.backbones={_shown(value)} names no backbone; give a list of conf/backbone options, e.g. "
            "'rank.backbones=[efficientnet_lite0,efficientnet_lite1]'"
        )
    entries = [_entry(item) for item in value]
    labels = [entry.label for entry in entries]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:
        raise UserError(
            f"rank.backbones: {twice} is listed twice; list each backbone once (two entries of one option need their own labels: {{backbone: {twice}, label: NAME, ...}})"
        )
    return entries


def _entry(item: Any) -> Entry:
    known = available_backbones()
    if isinstance(item, (DictConfig, dict)):
        settings = OmegaConf.to_container(item) if isinstance(item, DictConfig) else dict(item)
        option = settings.pop("backbone", None)
        label = settings.pop("label", option)
        if not isinstance(option, str):
            raise UserError(
                f"rank.backbones: {_shown(item)} names no backbone; write {{backbone: OPTION, weights: ..., label: NAME}}"
            )
    elif isinstance(item, str):
        option, label, settings = item, item, {}
    else:
        raise UserError(
            f"rank.backbones: {_shown(item)} is not a backbone name; give option names of conf/backbone ({', '.join(known)})"
        )
    if option not in known:
        close = difflib.get_close_matches(option, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"rank.backbones: {option!r} is not a backbone; {hint}choose from {', '.join(known)}")
    return Entry(str(label), option, settings)


def available_backbones() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml"))


def with_settings(entry: Entry, backbone_cfg: DictConfig) -> DictConfig:
    """The option's backbone config with the entry's own settings; an unknown setting or one left as ???
    (timm, torchvision: their `name`) is refused."""
    for key in entry.settings:
        if key not in backbone_cfg.keys():  # `in` alone says no for a ??? value
            close = difflib.get_close_matches(key, [str(k) for k in backbone_cfg], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(
                f"rank.backbones: {entry.label}: {key} is not a setting of backbone {entry.option}{hint}"
            )
    merged = OmegaConf.merge(backbone_cfg, entry.settings)
    missing = [key for key, value in OmegaConf.to_container(merged, resolve=False).items() if value == "???"]
    if missing:
        raise UserError(
            f"rank.backbones: {entry.label} needs backbone.{missing[0]}; give it in the entry, "
            f"e.g. '{{backbone: {entry.option}, {missing[0]}: ...}}'"
        )
    return merged


def check_settings(cfg: DictConfig) -> None:
    """The rank.* settings and the numbers the data module reads, before anything is built."""
    if str(cfg.rank.get("device")) not in DEVICES:
        raise UserError(f"rank.device={cfg.rank.get('device')!r} is not one of {', '.join(DEVICES)}")
    if cfg.rank.device == "cuda" and not _cuda():
        raise UserError("rank.device=cuda but this machine has no usable GPU; use rank.device=auto or cpu")
    shrinkage = cfg.rank.get("h_score_shrinkage")
    if shrinkage != "ledoit_wolf" and not (
        isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1
    ):
        raise UserError(f"rank.h_score_shrinkage={shrinkage!r} must be ledoit_wolf or a number in [0, 1]")
    check_numbers(cfg)
    check_mappings(cfg)
    check_seed(cfg.seed)


def check_run_dir(run_dir: Path) -> None:
    held = [name for name in OUTPUT_FILES if (run_dir / name).exists()]
    if held:
        raise UserError(
            f"hydra.run.dir={run_dir} already holds a ranking ({held[0]}); pick a new hydra.run.dir (nothing was changed)"
        )


def _shown(value: Any) -> str:
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    return "[]" if value == [] else repr(value)


@dataclass
class Candidate:
    """One backbone, built and checked, with its data module and source head; no features yet."""

    name: str
    backbone: Any  # a transferlab Backbone
    datamodule: Any
    source: Any


def run(cfg: DictConfig) -> list[dict]:
    from transferlab.data.datamodule import check_data_root  # heavy: Lightning (see check_command_line)
    from transferlab.data.features import feature_cache_on

    output_dir = Path(cfg.paths.output_dir)
    check_run_dir(output_dir)
    entries = backbone_entries(cfg.rank.backbones)
    check_settings(cfg)
    check_data_root(cfg.data)
    candidates = [prepare_seeded(entry, cfg, output_dir) for entry in entries]
    check_same_images(candidates)
    warn_if_too_few_per_class(candidates[0].datamodule.train.labels)
    device = feature_device(str(cfg.rank.device))
    described = describe_run(cfg, candidates[0].datamodule)
    rows = []
    for i, candidate in enumerate(candidates, start=1):
        log.info(
            "backbone %d of %d: %s (%s)",
            i,
            len(candidates),
            candidate.name,
            candidate.backbone.weights_source,
        )
        rows.append(score(candidate, device, cfg.rank.h_score_shrinkage, use_disk=feature_cache_on(cfg.data)))
        candidate.datamodule = None  # its images are no longer needed
    add_ranks(rows)
    csv_path, md_path = write_tables(rows, output_dir, described)
    print_table(rows)
    log.info("wrote %s and %s", csv_path, md_path)
    return rows


def backbone_config(entry: Entry, cfg: DictConfig) -> DictConfig:
    """The main command's config for `backbone=OPTION mode=frozen` (plus the entry's backbone settings)
    with this command's data settings."""
    composed = hydra.compose(config_name="train", overrides=[f"backbone={entry.option}", "mode=frozen"])
    with open_dict(composed):
        composed.backbone = with_settings(entry, composed.backbone)
        composed.seed = cfg.seed
        composed.data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    return composed


def prepare_seeded(entry: Entry, cfg: DictConfig, output_dir: Path) -> Candidate:
    """`prepare` from the seed, as a training run builds from it: a backbone with random init (no
    weights, or layers its weights do not cover) is the same network in every ranking with this
    seed, wherever it stands in rank.backbones, instead of new random numbers each command."""
    import lightning as L  # heavy: loaded after the checks before Hydra

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return prepare(entry, cfg, output_dir)


def prepare(entry: Entry, cfg: DictConfig, output_dir: Path) -> Candidate:
    """Build the backbone (weights loaded) and its data module (read, split, normalized for its weights)."""
    # heavy: build and rank.source import torch and Lightning; the checks before Hydra stay quick
    from transferlab.build import build_backbone, build_datamodule
    from transferlab.rank.source import source_head

    name = entry.label
    composed = backbone_config(entry, cfg)
    try:
        backbone = build_backbone(composed)
        source = source_head(composed.backbone, backbone)
    except Exception as error:
        refusal = bad_argument("backbone", error)
        if refusal is None:
            raise
        raise UserError(f"rank.backbones: {name} cannot be built: {refusal}") from error
    try:
        datamodule = build_datamodule(composed, backbone, output_dir)
    except Exception as error:
        refusal = bad_argument("data", error)
        if refusal is None:
            raise
        raise refusal from error
    return Candidate(name, backbone, datamodule, source)


def check_same_images(candidates: list[Candidate]) -> None:
    """Every backbone is scored on the same training images (the subset depends on data and seed only)."""
    import torch  # heavy: loaded after the checks before Hydra

    first = candidates[0].datamodule.train
    for other in candidates[1:]:
        if not torch.equal(other.datamodule.train.positions, first.positions):
            raise RuntimeError(
                f"{other.name} got other training images than {candidates[0].name}: a bug in the data module"
            )


#: the fewest training images per class at which the scores mean what their papers mean: with one
#: or two, every class mean is (almost) an image itself and the scores sit at their extremes
#: (unshrunk H-score C - 1, NCE 0 when the source's most probable class differs per image)
MIN_PER_CLASS = 3


def warn_if_too_few_per_class(labels) -> None:
    """One warning, for the whole ranking, when some class has fewer than MIN_PER_CLASS images."""
    import torch

    counts = torch.bincount(labels.long())
    present = counts[counts > 0]
    fewest = int(present.min()) if present.numel() else 0
    if fewest < MIN_PER_CLASS:
        log.warning(
            "a class has only %d training image%s: the scores sit at their extremes (H-score near C - 1, NCE near 0) "
            "and rank the backbones by chance; give at least %d per class (data.fewshot.per_class)",
            fewest,
            "" if fewest == 1 else "s",
            MIN_PER_CLASS,
        )


def feature_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if _cuda() else "cpu"
    return setting


def score(candidate: Candidate, device: str, shrinkage, use_disk: bool = True) -> dict:
    """Features of the training split (cached unless `use_disk` is off), then each score, timed."""
    from transferlab.data.features import feature_splits  # heavy: torch and Lightning

    started = time.perf_counter()
    train = feature_splits(
        candidate.backbone, candidate.datamodule, device, use_disk=use_disk, names=("train",)
    )["train"]
    features_time = time.perf_counter() - started
    features, labels = train.images.double().numpy(), train.labels.numpy()
    started = time.perf_counter()
    row = {
        "backbone": candidate.name,
        "weights": candidate.backbone.weights_source,
        "features": features.shape[1],
        "images": features.shape[0],
        "classes": len(candidate.datamodule.class_names),
        "logme": scores.logme(features, labels),
        "h_score": scores.h_score(features, labels, shrinkage=shrinkage),
    }
    row.update(source_scores(candidate, train.images, labels))
    row.update(features_time_s=round(features_time, 3), scores_time_s=round(time.perf_counter() - started, 3))
    log.info("%s: %s", candidate.name, ", ".join(f"{k}={row[k]:.4f}" for k in SCORES))
    return row


def source_scores(candidate: Candidate, features: torch.Tensor, labels) -> dict:
    """LEEP and NCE from the source head's probabilities; NaN with the reason when there is no head."""
    import torch  # heavy: loaded after the checks before Hydra

    if candidate.source.head is None:
        return {"leep": math.nan, "nce": math.nan, "note": f"LEEP, NCE n/a: {candidate.source.reason}"}
    with torch.inference_mode():
        logits = candidate.source.head(features.float()).double().numpy()
    probabilities = scores.softmax(logits)
    return {
        "leep": scores.leep(probabilities, labels),
        "nce": scores.nce(probabilities, labels),
        "note": f"LEEP, NCE from the source model's {probabilities.shape[1]}-class predictions",
    }


def _cuda() -> bool:
    import torch  # here: the checks before Hydra stay quick

    return torch.cuda.is_available()


def add_ranks(rows: list[dict]) -> None:
    for name in SCORES:
        for row, rank in zip(rows, scores.ranks([row[name] for row in rows])):
            row[f"rank_{name}"] = rank


def describe_run(cfg: DictConfig, datamodule) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {
        "dataset": getattr(datamodule, "name", data.get("_target_")),
        "classes": len(datamodule.class_names),
        "training images": len(datamodule.train),
        "image_size": data.get("image_size"),
        "fewshot": data.get("fewshot"),
        "val_size": data.get("val_size"),
        "seed": cfg.seed,
        "h_score_shrinkage": cfg.rank.h_score_shrinkage,
    }


if __name__ == "__main__":
    main()
