"""Bad input through the real command line: one line on stderr, a non-zero exit, no training.

Every case is a real `python -m transferlab` process (about 5 s of imports each), so the
list keeps one case per kind of mistake. Hydra reports unknown config choices itself, over
several lines that list the available options; our own errors are exactly one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli, run_training, tiny_run

from transferlab.cli.overrides import check_command_line, command_line_overrides
from transferlab.data.datamodule import check_data_root
from transferlab.utils.errors import UserError, user_error_behind

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: a small, fast run on the tiny data; every case adds the mistake to it
BASE = tiny_run()


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs the cases point at: a cnn_small checkpoint, a non-state-dict, a stray folder, a file."""
    from transferlab.models import TransferModule, cnn_small, linear_head

    folder = tmp_path_factory.mktemp("inputs")
    backbone = cnn_small(image_size=32)
    model = TransferModule(backbone, linear_head(backbone.out_features, 10), num_classes=10)
    checkpoint = {  # what Lightning writes, as far as the checks read it
        "state_dict": model.state_dict(),
        "transferlab": {
            "backbone": "cnn_small",
            "data": {"dataset": "cifar10", "class_names": CIFAR10_CLASSES},
            "num_classes": 10,
        },
    }
    paths = {
        "cnn_small_ckpt": folder / "cnn_small.ckpt",
        "list_pth": folder / "list.pth",
        "stray": folder / "stray",
        "a_file": folder / "a_file",
    }
    torch.save(checkpoint, paths["cnn_small_ckpt"])
    paths["five_epochs_ckpt"] = folder / "five_epochs.ckpt"
    torch.save({**checkpoint, "epoch": 4}, paths["five_epochs_ckpt"])  # saved at the end of epoch index 4
    torch.save([1, 2, 3], paths["list_pth"])
    paths["stray"].mkdir()
    (paths["stray"] / "notes.txt").write_text("not a dataset\n")
    paths["a_file"].write_text("")
    return paths


# (id, extra arguments ({name} is a path from the `files` fixture), text the message must contain)
# One case per place a check lives; `IN_PROCESS_CASES` below covers the others without a process each.
CHOICE_CASES = [
    ("unknown-backbone", ["backbone=foo"], "backbone=foo is not a choice of backbone (choices: cnn_small,"),
    (
        "mistyped-mode",
        ["mode=frozzen"],
        "mode=frozzen is not a choice of mode; did you mean frozen? (choices: finetune, frozen,",
    ),
    (
        "mistyped-experiment",
        ["experiment=vgg_frozn"],
        "experiment=vgg_frozn is not a choice of experiment; did you mean vgg_frozen?",
    ),
]
CLI_CASES = [
    ("batch-size", ["data.batch_size=0"], "data.batch_size=0 must be a positive integer"),
    (
        "fewshot-both",
        ["data.fewshot.per_class=2", "data.fewshot.fraction=0.5"],
        "both set; set only one of them",
    ),
    (
        "fewshot-above-smallest-class",
        ["data.fewshot.per_class=1000"],
        "has only 25 training images; use per_class <= 25",
    ),
    ("unknown-class", ["data.classes=[cat,unicorn]"], "unknown class 'unicorn'; valid names: airplane"),
    (
        "image-too-small",
        ["backbone=vgg11_bn", "data.image_size=16"],
        "data.image_size=16 is too small for vgg11_bn",
    ),
    ("weights-not-state-dict", ["backbone.weights={list_pth}"], "holds a list, not a state dict"),
    (
        "resume-other-backbone",
        ["backbone=vgg11_bn", "ckpt_path={cnn_small_ckpt}"],
        "(trained with backbone cnn_small on cifar10) does not fit this run's model: the checkpoint has no backbone.body.0.weight",
    ),
    ("root-without-dataset", ["data.root={stray}", "data.download=true"], "holds no cifar10"),
    ("output-dir-not-writable", ["hydra.run.dir={a_file}/run"], "cannot be created (Not a directory"),
    # config syntax: Hydra/OmegaConf would print many lines (COMMAND_LINE_CASES covers the rest)
    (
        "interpolation-unknown",
        ["data.fewshot.per_class=${{oops}}"],
        "data.fewshot.per_class=${oops}: Interpolation key 'oops' not found",
    ),
    ("key-mistyped", ["data.batchsize=5"], "data.batchsize is not a setting; did you mean data.batch_size?"),
    ("multirun-after-overrides", ["-m", "seed=1,2"], "put -m before the overrides"),
]
# Settings under which a run would train nothing, forever, or with numbers a constructor refuses:
# one line naming the key, before any data is read (DEGENERATE_IN_PROCESS covers the rest).
DEGENERATE_CASES = [
    ("max-epochs-zero", ["trainer.max_epochs=0"], "trainer.max_epochs=0 trains nothing"),
    (
        "max-epochs-forever",
        ["trainer.max_epochs=-1"],
        "trainer.max_epochs=-1 trains forever unless trainer.max_steps > 0",
    ),
    (
        "no-train-batches",
        ["trainer.limit_train_batches=0.0"],
        "trainer.limit_train_batches=0.0 trains nothing",
    ),
    ("lr-negative", ["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is outside [1e-10, 10]"),
    ("head-hidden-zero", ["head=mlp", "head.hidden=0"], "head: hidden=0 must be a positive integer"),
    ("precision-unknown", ["trainer.precision=fp7"], "trainer.precision=fp7 is not a precision"),
]
IN_PROCESS_CASES = [
    ("fewshot-zero", ["data.fewshot.per_class=0"], "data.fewshot.per_class=0 must be a positive integer"),
    ("fewshot-fraction-zero", ["data.fewshot.fraction=0"], "data.fewshot.fraction=0 must be in (0, 1]"),
    (
        "fewshot-fraction-above-one",
        ["data.fewshot.fraction=1.5"],
        "data.fewshot.fraction=1.5 must be in (0, 1]",
    ),
    ("val-size", ["data.val_size=300"], "data.val_size=300 leaves no training images"),
    ("batch-size-negative", ["data.batch_size=-4"], "data.batch_size=-4 must be a positive integer"),
    ("weights-missing", ["backbone.weights=/x.pth"], "backbone.weights=/x.pth: no such file"),
    (
        "weights-other-backbone",
        ["backbone=vgg11_bn", "backbone.weights={cnn_small_ckpt}"],
        "do not match the backbone architecture",
    ),
    ("resume-missing-last", ["ckpt_path=last"], "ckpt_path=last but"),
    (
        "resume-other-head",
        ["head=mlp", "ckpt_path={cnn_small_ckpt}"],
        "does not fit this run's model: the checkpoint has no head.",
    ),
    (
        "resume-other-classes",
        ["data.classes=[cat,dog]", "ckpt_path={cnn_small_ckpt}"],
        "this run has [cat,dog] (2)",
    ),
    (
        "resume-other-dataset",
        ["data=cifar100", "ckpt_path={cnn_small_ckpt}"],
        "was trained on cifar10, but this run uses cifar100",
    ),
    ("resume-not-a-checkpoint", ["ckpt_path={list_pth}"], "is not a Lightning checkpoint (no state_dict)"),
    (
        "required-setting",
        ["backbone=torchvision"],
        "backbone.name must be set (the config leaves it as ???); add backbone.name=...",
    ),
    (
        "root-is-dataset-folder",
        ["data.root={root}/cifar-10-batches-py"],
        "is the dataset folder itself; set data.root=",
    ),
    ("batch-size-not-a-number", ["data.batch_size=12a"], "data.batch_size='12a' is not an integer"),
    ("lr-not-a-number", ["optimizer.lr=fast"], "optimizer.lr='fast' is not a number"),
    ("max-epochs-negative", ["trainer.max_epochs=-5"], "`max_epochs` must be a non-negative integer or -1"),
    (
        "resume-more-epochs-than-budget",
        ["ckpt_path={five_epochs_ckpt}"],
        "already trained 5 epochs, more than trainer.max_epochs=1; set trainer.max_epochs>=5",
    ),
    (
        "resume-other-class-order",
        ["data.classes=[" + ",".join(reversed(CIFAR10_CLASSES)) + "]", "ckpt_path={cnn_small_ckpt}"],
        "does not fit this run's model: it was trained on the classes [airplane,automobile,bird,cat,deer,dog,...] (10), this run has [truck,ship,",
    ),
]
DEGENERATE_IN_PROCESS = [
    (
        "label-smoothing-with-a-solve",
        ["mode=linear_probe", "data.augment=false", "model.label_smoothing=0.3"],
        "model.label_smoothing=0.3 with mode=linear_probe: the probe solves plain cross-entropy",
    ),
    (
        "warmup-start-text",
        ["scheduler=warmup_cosine", "scheduler.start_factor=abc", "trainer.max_epochs=2"],
        "scheduler: start_factor='abc' must be in (0, 1]",
    ),
    ("label-smoothing-one", ["model.label_smoothing=1"], "model.label_smoothing=1 must be in [0, 1)"),
    (
        "label-smoothing-negative",
        ["model.label_smoothing=-0.1"],
        "model.label_smoothing=-0.1 must be in [0, 1)",
    ),
    (
        "label-smoothing-text",
        ["model.label_smoothing=abc"],
        "model.label_smoothing='abc' must be a number in [0, 1)",
    ),
    (
        "warmup-fills-the-budget",
        ["scheduler=warmup_cosine", "scheduler.warmup_epochs=1", "trainer.max_epochs=1"],
        "scheduler: warmup_epochs=1 leaves no epoch of decay in T_max=1",
    ),
    (
        "warmup-negative",
        ["scheduler=warmup_cosine", "scheduler.warmup_epochs=-1", "trainer.max_epochs=2"],
        "scheduler: warmup_epochs=-1 must be a whole number >= 0",
    ),
    (
        "warmup-fractional",
        ["scheduler=warmup_cosine", "scheduler.warmup_epochs=0.5", "trainer.max_epochs=2"],
        "scheduler: warmup_epochs=0.5 must be a whole number >= 0",
    ),
    (
        "warmup-start-zero",
        ["scheduler=warmup_cosine", "scheduler.start_factor=0", "trainer.max_epochs=2"],
        "scheduler: start_factor=0 must be in (0, 1]",
    ),
    (
        "warmup-start-above-one",
        ["scheduler=warmup_cosine", "scheduler.start_factor=2", "trainer.max_epochs=2"],
        "scheduler: start_factor=2 must be in (0, 1]",
    ),
    (
        "no-train-batches-int",
        ["trainer.limit_train_batches=0"],
        "trainer.limit_train_batches=0 trains nothing",
    ),
    ("no-val-batches", ["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0 never validates"),
    ("no-test-batches", ["trainer.limit_test_batches=0"], "tests nothing (use test=false to skip the test)"),
    ("max-steps-zero", ["+trainer.max_steps=0"], "trainer.max_steps=0 trains nothing"),
    ("seed-negative", ["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    ("weight-decay-negative", ["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 is outside [0, 1]"),
    (
        "adamw-beta",
        ["optimizer=adamw", "+optimizer.betas=[0.9,1.5]"],
        "optimizer: Invalid beta parameter at index 1: 1.5",
    ),
    ("momentum-not-a-number", ["optimizer.momentum=abc"], "optimizer.momentum='abc' is not a number"),
    ("head-dropout", ["head.dropout=1.5"], "head: dropout=1.5 must be a number in [0, 1)"),
    ("head-hidden-not-a-number", ["head=mlp", "head.hidden=1.5"], "head.hidden=1.5 is not an integer"),
    (
        "unknown-trainer-argument",
        ["+trainer.no_such_argument=1"],
        "trainer: Trainer.__init__() got an unexpected keyword argument 'no_such_argument'",
    ),
    (
        "scheduler-bad-target",
        ["scheduler._target_=torch.optim.lr_scheduler.NoSuch"],
        "scheduler: Error locating target 'torch.optim.lr_scheduler.NoSuch'",
    ),
    (
        "optimized-test-metric-untested",
        ["test=false", "optimized_metric=test/acc"],
        "optimized_metric=test/acc is only measured with test=true",
    ),
    # runs that would never validate: exit 0 with no val/acc_best for the sweeper
    (
        "validate-after-last-epoch",
        ["trainer.check_val_every_n_epoch=5", "trainer.max_epochs=2"],
        "trainer.check_val_every_n_epoch=5 with trainer.max_epochs=2 never validates",
    ),
    (
        "validate-every-zero",
        ["trainer.check_val_every_n_epoch=0"],
        "trainer.check_val_every_n_epoch=0 never validates",
    ),
    (
        "max-steps-before-validation",
        ["+trainer.max_steps=3"],
        "trainer.max_steps=3 stops before the first validation (after 8 steps)",
    ),
    ("val-size-zero", ["data.val_size=0"], "data.val_size=0 leaves no validation images"),
    (
        "scheduler-step-size-zero",
        ["scheduler=step", "scheduler.step_size=0"],
        "scheduler: integer modulo by zero (check the scheduler.* settings)",
    ),
    (
        "optimized-metric-typo",
        ["optimized_metric=val/acc_bets"],
        "optimized_metric=val/acc_bets is not a metric of the run; did you mean val/acc_best?",
    ),
    ("momentum-above-one", ["optimizer.momentum=2"], "optimizer.momentum=2 must be in [0, 1)"),
    (
        "crop-padding-negative",
        ["data.augment=true", "data.crop_padding=-3"],
        "data.crop_padding=-3 must be an integer >= 0",
    ),
    (
        "gradual-never-unfreezes",
        ["mode=gradual", "mode.unfreeze_at_epoch=5", "trainer.max_epochs=2"],
        "mode.unfreeze_at_epoch=5 with trainer.max_epochs=2: the backbone never unfreezes",
    ),
    ("image-too-large", ["data.image_size=100000"], "data.image_size=100000 is too large for cnn_small"),
    ("fewshot-not-a-mapping", ["++data.fewshot=5"], "data.fewshot=5 must be a group of settings"),
    ("backbone-lr-ratio-negative", ["model.backbone_lr_ratio=-1"], "model.backbone_lr_ratio=-1 must be >= 0"),
    (
        "layer-decay-above-one",
        ["model.layer_decay=1.5"],
        "model.layer_decay=1.5 must be in (0, 1] (or null for none)",
    ),
    ("layer-decay-not-a-number", ["model.layer_decay=fast"], "model.layer_decay='fast' is not a number"),
    (
        "limit-fraction-above-one",
        ["trainer.limit_train_batches=1.5"],
        "trainer.limit_train_batches=1.5 is a fraction above 1; set a fraction in (0, 1] or a whole number",
    ),
]
# Mistakes in the command line itself, refused before Hydra by check_command_line (one line each)
COMMAND_LINE_CASES = [
    (
        "interpolation-unknown",
        ["data.fewshot.per_class=${oops}"],
        "data.fewshot.per_class=${oops}: Interpolation key 'oops' not found",
    ),
    (
        "delete-a-setting",
        ["~data.root"],
        "~data.root removes a setting the run needs; set it instead (data.root=...)",
    ),
    (
        "key-mistyped",
        ["data.batchsize=5"],
        "data.batchsize is not a setting; did you mean data.batch_size? (+data.batchsize=value adds a new one)",
    ),
    ("key-unknown", ["nosuchkey=1"], "nosuchkey is not a setting (+nosuchkey=value adds a new one)"),
    (
        "grammar",
        ["data.classes=[cat,dog"],
        "data.classes=[cat,dog cannot be parsed (no viable alternative at input '[cat,dog')",
    ),
    ("multirun-after-overrides", ["backbone=cnn_small", "-m", "seed=1,2"], "put -m before the overrides"),
    (
        "flag-between-overrides",
        ["backbone=cnn_small", "--cfg", "job", "seed=1"],
        "put --cfg before the overrides",
    ),
]


def cases(table, fast=()):
    """`table`'s (id, *values) rows as parameters; each a real process, so all but the `fast` ids are slow."""
    return [pytest.param(*c[1:], id=c[0], marks=() if c[0] in fast else pytest.mark.slow) for c in table]


@pytest.mark.parametrize("extra, expected", cases(CHOICE_CASES, fast={"mistyped-mode"}))
def test_unknown_config_choice_is_refused_in_one_line(extra, expected, cifar10_root, torch_home, tmp_path):
    result = cli([f"data.root={cifar10_root}", *BASE, *extra, "hydra.run.dir=run"], tmp_path, torch_home)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line (Hydra's spans 16)
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, expected", cases(CLI_CASES, fast={"batch-size"}))
def test_bad_input_is_refused_in_one_line(extra, expected, files, cifar10_root, torch_home, tmp_path):
    extra = [a.format(**files) for a in extra]
    run_dir = [] if any(a.startswith("hydra.run.dir=") for a in extra) else ["hydra.run.dir=run"]
    args = [f"data.root={cifar10_root}", *BASE, *run_dir, *extra]
    result = cli(args, tmp_path, torch_home)
    assert result.returncode == 2, result.stderr
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("transferlab: error: ")
    assert expected in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # no training started
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("extra, expected", cases(DEGENERATE_CASES, fast={"max-epochs-zero"}))
def test_degenerate_settings_are_refused_in_one_line_before_reading_data(
    extra, expected, cifar10_root, torch_home, tmp_path
):
    # data.download=false and a root without the data: a check that came after the data would
    # say "holds no cifar10" instead.
    (tmp_path / "empty").mkdir()
    args = [f"data.root={tmp_path / 'empty'}", "data.download=false", *BASE, "hydra.run.dir=run", *extra]
    result = cli(args, tmp_path, torch_home)
    assert result.returncode == 2, result.stderr
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("transferlab: error: ") and expected in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [c[1:] for c in IN_PROCESS_CASES + DEGENERATE_IN_PROCESS],
    ids=[c[0] for c in IN_PROCESS_CASES + DEGENERATE_IN_PROCESS],
)
def test_bad_input_is_refused_before_training(extra, expected, files, cifar10_root, tmp_path):
    extra = [a.format(root=cifar10_root, **files) for a in extra]
    with pytest.raises(Exception) as raised:
        run_training([f"data.root={cifar10_root}", *BASE, *extra], tmp_path / "run")
    error = user_error_behind(raised.value)  # Hydra's instantiate wraps errors from constructors
    assert error is not None, raised.value
    assert expected in str(error)
    assert "\n" not in str(error)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "extra, expected", [c[1:] for c in COMMAND_LINE_CASES], ids=[c[0] for c in COMMAND_LINE_CASES]
)
def test_command_line_mistakes_are_refused_before_hydra(extra, expected, tmp_path):
    with pytest.raises(UserError) as raised:
        check_command_line([*extra, f"hydra.run.dir={tmp_path / 'run'}"])
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "seed=1,2"],
        ["~logger"],
        ["+data.extra=1"],
        ["data.classes=[cat,dog]"],
        ["--cfg", "job", "nosuchkey=1"],
    ],
    ids=["sweep", "delete-a-group", "add-a-key", "list", "no-job"],
)
def test_command_line_check_accepts_what_composes(argv, tmp_path):
    folder = "hydra.sweep.dir" if "-m" in argv else "hydra.run.dir"
    check_command_line([*argv, f"{folder}={tmp_path / 'run'}"])  # raises nothing


def test_optimized_metric_names_come_from_the_model():
    from transferlab.run.results import logged_metrics

    assert {"train/loss", "val/acc", "val/acc_best", "test/acc"} <= set(logged_metrics())


def test_tiny_fewshot_fraction_warns_that_it_keeps_one_image(caplog):
    from transferlab.data.subsets import fewshot_indices

    labels = torch.arange(2).repeat(10)  # 10 images per class
    chosen = fewshot_indices(labels, ["cat", "dog"], per_class=None, fraction=0.001, seed=0)
    assert len(chosen) == 2
    assert "data.fewshot.fraction=0.001 rounds to fewer than 1 image per class" in caplog.text


@pytest.mark.parametrize(
    "extra, warns",
    [
        (["mode=frozen"], True),
        (["mode=frozen", "backbone.weights={ckpt}"], False),
        (["mode=finetune"], False),
    ],
)
def test_frozen_random_backbone_is_allowed_with_a_warning(extra, warns, files, caplog, tmp_path):
    from conftest import compose_config

    from transferlab.methods.mode_facts import check_mode

    cfg = compose_config(
        ["backbone=cnn_small", *[a.format(ckpt=files["cnn_small_ckpt"]) for a in extra]], tmp_path
    )
    check_mode(cfg.mode, cfg.trainer.max_epochs, cfg.backbone.weights)
    assert (
        "mode=frozen with random weights: the backbone is a fixed random feature extractor" in caplog.text
    ) == warns


@pytest.mark.parametrize("how", ["inside-lightning", "outside-lightning"])
def test_ctrl_c_says_how_to_resume(how, tmp_path, capsys):
    from types import SimpleNamespace

    from transferlab.train import ctrl_c_reported

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    trainer = SimpleNamespace(interrupted=True)
    with pytest.raises(SystemExit) as raised, ctrl_c_reported(trainer, tmp_path):
        raise SystemExit(1) if how == "inside-lightning" else KeyboardInterrupt
    assert raised.value.code == 130
    assert (
        capsys.readouterr().err
        == f"transferlab: interrupted; resume with ckpt_path=last hydra.run.dir={tmp_path}\n"
    )


def test_ctrl_c_before_the_first_checkpoint_says_the_run_starts_over(tmp_path, capsys):
    from types import SimpleNamespace

    from transferlab.train import ctrl_c_reported

    with pytest.raises(SystemExit), ctrl_c_reported(SimpleNamespace(interrupted=True), tmp_path):
        raise KeyboardInterrupt
    assert capsys.readouterr().err.endswith("(no checkpoint saved yet: it starts over)\n")


def test_other_exits_pass_through_the_ctrl_c_report(tmp_path):
    from types import SimpleNamespace

    from transferlab.train import ctrl_c_reported

    with pytest.raises(SystemExit) as raised, ctrl_c_reported(SimpleNamespace(interrupted=False), tmp_path):
        raise SystemExit(3)
    assert raised.value.code == 3


@pytest.mark.parametrize("choice", ["head=foo", "mode=foo", "data=foo"])
def test_unknown_choices_are_hydra_config_errors(choice, tmp_path):
    from conftest import compose_config
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Could not find"):
        compose_config([choice], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["HYDRA_FULL_ERROR", "TRANSFERLAB_DEBUG"])
def test_debug_shows_the_traceback(switch, cifar10_root, torch_home, tmp_path):
    args = [f"data.root={cifar10_root}", *BASE, "data.batch_size=0", "hydra.run.dir=run"]
    result = cli(args, tmp_path, torch_home, **{switch: "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "data.batch_size=0 must be a positive integer" in result.stderr


@pytest.mark.slow
def test_second_command_into_a_finished_run_dir_changes_nothing(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    run_training([f"data.root={cifar10_root}", *BASE], run_dir)
    # What Hydra saves for a CLI run; written here by hand because the first run was in-process.
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    before = {p: p.read_bytes() for p in (run_dir / ".hydra" / "config.yaml", run_dir / "metrics.json")}

    result = cli(
        [f"data.root={cifar10_root}", *BASE, "seed=5", f"hydra.run.dir={run_dir}"], tmp_path, torch_home
    )

    assert result.returncode == 2
    assert nonempty_lines(result.stderr) == [
        f"transferlab: error: {run_dir} already holds a run; pick a new hydra.run.dir, or resume it with ckpt_path=last"
    ]
    assert {p: p.read_bytes() for p in before} == before


# ---- the checks themselves, without a process per case ------------------------------------------
def _finished_run(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    return folder


def test_command_line_check_refuses_a_finished_run_dir_unless_resuming(tmp_path):
    run_dir = _finished_run(tmp_path / "run")
    with pytest.raises(UserError, match="already holds a run"):
        check_command_line([f"hydra.run.dir={run_dir}", "seed=1"])
    check_command_line([f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    check_command_line([f"hydra.run.dir={run_dir}", "--cfg", "job"])  # prints the config, runs nothing
    check_command_line([f"hydra.run.dir={run_dir}/${{now:%H}}"])  # known only once Hydra resolves it
    check_command_line([f"hydra.run.dir={tmp_path / 'new' / 'run'}"])
    assert not (tmp_path / "new").exists()  # proven creatable, not created


def test_command_line_check_refuses_resuming_last_in_a_new_default_run_dir():
    # The default run dir is new for every command: there is no last.ckpt to resume there.
    with pytest.raises(
        UserError, match="ckpt_path=last resumes the run in hydra.run.dir; add hydra.run.dir="
    ):
        check_command_line(["ckpt_path=last", "seed=1"])


def test_command_line_check_refuses_a_sweep_dir_that_holds_runs(tmp_path):
    _finished_run(tmp_path / "sweep" / "0_seed=1")
    with pytest.raises(UserError, match="already holds runs"):
        check_command_line(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=1,2"])
    check_command_line(["-m", f"hydra.sweep.dir={tmp_path / 'other'}", "seed=1,2"])


@pytest.mark.parametrize("argv", [["-m", "seed=1,2", "hydra.run.dir={d}"], ["hydra.run.dir={d}", "-m"]])
def test_a_sweep_given_a_run_dir_is_refused(argv, tmp_path):
    # Hydra's jobs would go under hydra.sweep.dir (multirun/<date>/...), the run dir never written
    with pytest.raises(UserError, match="jobs go under hydra.sweep.dir, not hydra.run.dir"):
        check_command_line([a.format(d=tmp_path / "run") for a in argv])
    assert not (tmp_path / "run").exists()


def test_command_line_overrides_read_like_hydra():
    argv = ["-m", "+ckpt_path=last", "hydra.run.dir='/tmp/a b'", "--config-name=train", "seed=1", "x"]
    assert command_line_overrides(argv) == {"ckpt_path": "last", "hydra.run.dir": "/tmp/a b", "seed": "1"}


def _data(root: Path, download: bool, dataset: str = "CIFAR100"):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {"_target_": f"transferlab.data.{dataset}DataModule", "root": str(root), "download": download}
    )


def test_data_root_rules(tmp_path, cifar10_root):
    check_data_root(_data(tmp_path / "missing", download=True))  # a new folder: the download goes there
    (tmp_path / "empty").mkdir()
    check_data_root(_data(tmp_path / "empty", download=True))
    (tmp_path / "empty" / ".DS_Store").write_text("")
    check_data_root(_data(tmp_path / "empty", download=True))  # hidden files do not count
    # A shared data folder that already holds CIFAR-10 gets CIFAR-100 next to it.
    check_data_root(_data(cifar10_root, download=True))
    with pytest.raises(UserError, match="holds no cifar100"):
        check_data_root(_data(cifar10_root, download=False))
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("")
    with pytest.raises(UserError, match="does not download into a folder of unrelated files"):
        check_data_root(_data(tmp_path / "stray", download=True))
    with pytest.raises(UserError, match="is the dataset folder itself"):
        check_data_root(_data(cifar10_root / "cifar-10-batches-py", download=True, dataset="CIFAR10"))
