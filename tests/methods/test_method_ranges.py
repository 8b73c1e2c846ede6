"""Issue 24, classes 2 and 5: each method's settings inside the range where it means what its paper
means and where the computation is finite, and every fix a refusal suggests gets past it."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import cli, compose_config

from transferlab.utils.errors import UserError


def _check(overrides: list[str], tmp_path, root) -> None:
    from transferlab.build import check_config

    cfg = compose_config(
        ["backbone=cnn_small", f"data.root={root}", "data.download=false", *overrides], tmp_path / "cfg"
    )
    check_config(cfg, tmp_path / "run")


# ---- values at the edge of their type ----------------------------------------------------------
OUT_OF_RANGE = [
    (["optimizer.lr=inf"], "optimizer.lr=inf is not a finite number"),
    (["optimizer.lr=nan"], "optimizer.lr=nan is not a finite number"),
    (["optimizer.lr=1e300"], "optimizer.lr=1e+300 is outside [1e-10, 10]"),
    (["optimizer.lr=0"], "optimizer.lr=0 is outside [1e-10, 10]"),
    (["optimizer.weight_decay=2"], "optimizer.weight_decay=2 is outside [0, 1]"),
    (["head.dropout=inf"], "head.dropout=inf is not a finite number"),
    (
        ["data.batch_size=100000000000"],
        "data.batch_size=100000000000 is above 1048576: more images than any split here holds",
    ),
    (["data.eval_batch_size=2000000"], "data.eval_batch_size=2000000 is outside [1, 1048576]"),
    (
        ["data.eval_batch_size=0"],
        "data.eval_batch_size=0 is outside [1, 1048576]: a batch holds at least one image",
    ),
    (["data.eval_batch_size=-8"], "data.eval_batch_size=-8 is outside [1, 1048576]"),
    # precision: fp16 on the CPU (Lightning would train bf16-mixed instead), and a name it lacks
    (
        ["trainer.accelerator=cpu", "trainer.precision=16-mixed"],
        "trainer.precision=16-mixed is fp16, which needs a GPU",
    ),
    (
        ["trainer.accelerator=cpu", "trainer.precision=16-true"],
        "trainer.precision=16-true is fp16, which needs a GPU",
    ),
    (["trainer.precision=half"], "trainer.precision=half is not a precision; use one of 32-true"),
    # trainer.devices that name no device (Lightning's own message had no fix)
    (["trainer.devices=0"], "trainer.devices=0 names no device; use trainer.devices=auto"),
    (["trainer.devices=-2"], "trainer.devices=-2 names no device"),
    (["trainer.devices=[]"], "trainer.devices=[] must list device indices"),
    (["trainer.devices=[0,-1]"], "trainer.devices=[0, -1] must list device indices"),
    (["trainer.devices=[0,0]"], "trainer.devices=[0, 0] lists a device twice"),
    (["trainer.devices='0'"], "trainer.devices='0' names no device"),
    (["trainer.devices=two"], "trainer.devices='two' names no device"),
    (["trainer.devices=true"], "trainer.devices=True is not a number of devices"),
    (["trainer.devices=1.5"], "trainer.devices=1.5 is not a number or list of devices"),
    (["mode=linear_probe", "mode.l2_grid=[1e300]"], "mode.l2_grid has 1e+300, outside [1e-12, 10000]"),
    (["mode=lp_ft", "mode.l2_grid=[0.1,1e-20]"], "mode.l2_grid has 1e-20, outside"),
    (
        ["mode=finetune", "regularizer=l2sp", "regularizer.alpha=1e300"],
        "regularizer.alpha=1e+300 must be a number in [0, 10000]",
    ),
    (
        ["mode=finetune", "regularizer=l2sp", "regularizer.beta=inf"],
        "regularizer.beta=inf must be a number in [0, 10000]",
    ),
    (
        ["mode=finetune", "regularizer=bss", "regularizer.eta=-1"],
        "regularizer.eta=-1 must be a number in [0, 10000]",
    ),
    # class 2: BSS whose k covers every singular value of a batch is feature-norm decay
    (
        ["mode=finetune", "regularizer=bss", "regularizer.k=32", "data.batch_size=32"],
        "regularizer.k=32 with data.batch_size=32: a batch has at most 32 singular values",
    ),
]


@pytest.mark.parametrize("overrides, message", OUT_OF_RANGE)
def test_numbers_outside_their_meaningful_range_are_refused_before_anything_is_built(
    overrides, message, tmp_path, cifar10_root
):
    with pytest.raises(UserError, match=re.escape(message)):
        _check(overrides, tmp_path, cifar10_root)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer.lr=10"],
        ["data.batch_size=1048576"],
        ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"],
        ["trainer.devices=1"],
        ["trainer.devices=-1"],
        ["trainer.devices=auto"],
        ["trainer.devices=[0]"],
        ["mode=linear_probe", "mode.l2_grid=[1e-12,10000]"],
        ["mode=finetune", "regularizer=bss", "regularizer.k=31", "data.batch_size=32"],
        ["mode=finetune", "regularizer=bss", "regularizer.eta=10000"],
    ],
)
def test_the_edges_of_those_ranges_are_accepted(overrides, tmp_path, cifar10_root):
    _check(overrides, tmp_path, cifar10_root)


@pytest.mark.slow
def test_an_out_of_range_number_is_one_line_exit_2_from_the_command_line(tmp_path, torch_home, cifar10_root):
    done = cli(
        [
            "mode=linear_probe",
            "mode.l2_grid=[1e300]",
            f"data.root={cifar10_root}",
            "data.download=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        torch_home,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("transferlab: error: mode.l2_grid has 1e+300")
    assert "computing the backbone features" not in done.stdout


def test_bss_warns_once_when_a_smaller_last_batch_has_no_more_singular_values_than_k(caplog):
    from transferlab.methods.regularizers import BSS

    bss = BSS(eta=0.1, k=4)
    with caplog.at_level(logging.WARNING):
        bss(None, torch.randn(16, 8))  # 8 singular values: k=4 is BSS
        assert "penalizes all of them" not in caplog.text
        bss(None, torch.randn(3, 8))  # the last batch: 3 singular values, all penalized
        bss(None, torch.randn(2, 8))
    assert caplog.text.count("penalizes all of them") == 1


def test_a_ranking_from_too_few_images_per_class_warns_once(caplog):
    from transferlab.rank.__main__ import warn_if_too_few_per_class

    with caplog.at_level(logging.WARNING):
        warn_if_too_few_per_class(torch.tensor([0, 0, 0, 1, 1, 1]))
        assert caplog.text == ""
        warn_if_too_few_per_class(torch.tensor([0, 0, 0, 1, 1]))
    assert caplog.text.count("a class has only 2 training images") == 1


# ---- advice that works -------------------------------------------------------------------------
# (what is refused, the fix its message suggests, words of the message): the fix must get past it
ADVICE = [
    (["mode=linear_probe", "head=mlp"], ["head=linear"], "use head=linear"),
    (["mode=linear_probe", "data.augment=true"], ["data.augment=false"], "set data.augment=false"),
    (["mode=linear_probe", "ckpt_path=last"], ["ckpt_path=null"], "drop ckpt_path"),
    (
        ["mode=knn", "trainer.limit_val_batches=2"],
        ["trainer.limit_val_batches=1.0"],
        "drop trainer.limit_val_batches",
    ),
    (["mode=frozen", "regularizer=bss"], ["regularizer=none"], "or regularizer=none"),
    (["mode=scratch", "regularizer=l2sp"], ["mode=finetune"], "use a mode that starts from backbone.weights"),
    (
        ["mode=linear_probe", "model.label_smoothing=0.3"],
        ["model.label_smoothing=0"],
        "use model.label_smoothing=0",
    ),
    (
        ["mode=finetune", "data.cache_features=true"],
        ["data.cache_features=auto"],
        "data.cache_features=true needs mode=frozen",
    ),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=1"], "set trainer.max_epochs >= 1"),
    (["+trainer.max_steps=0"], ["trainer.max_steps=-1"], "set trainer.max_steps=-1"),
    (
        ["trainer.check_val_every_n_epoch=5", "trainer.max_epochs=2"],
        ["trainer.check_val_every_n_epoch=2"],
        "set trainer.check_val_every_n_epoch<=2",
    ),
    (["trainer.limit_test_batches=0"], ["test=false"], "use test=false to skip the test"),
    (["trainer.limit_val_batches=1.5"], ["trainer.limit_val_batches=1"], "(trainer.limit_val_batches=1)"),
    (
        ["mode=gradual", "mode.unfreeze_at_epoch=5", "trainer.max_epochs=3"],
        ["trainer.max_epochs=6"],
        "or trainer.max_epochs>5",
    ),
    (
        ["mode=finetune", "regularizer=bss", "regularizer.k=32", "data.batch_size=32"],
        ["regularizer.k=1"],
        "set regularizer.k<32",
    ),
    (["mode=linear_probe", "mode.l2_grid=[1e300]"], ["mode.l2_grid=[1e4]"], "keep the grid inside"),
    (["optimizer.lr=1e300"], ["optimizer.lr=10"], "outside [1e-10, 10]"),
]


def with_fix(refused: list[str], fix: list[str]) -> list[str]:
    """The refused command line with the fix's settings in place of its own (a `+key` stays appended)."""

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+")

    settings = {key(o): o for o in refused}
    for override in fix:
        plus = "+" if settings.get(key(override), "").startswith("+") else ""
        settings[key(override)] = plus + override.lstrip("+")
    return list(settings.values())


@pytest.mark.parametrize("refused, fix, words", ADVICE)
def test_the_fix_a_refusal_suggests_gets_past_it(refused, fix, words, tmp_path, cifar10_root):
    with pytest.raises(UserError) as first:
        _check(refused, tmp_path, cifar10_root)
    assert words in str(first.value)
    try:
        _check(with_fix(refused, fix), tmp_path, cifar10_root)
    except UserError as second:  # another check may still refuse, but never the same one
        assert str(second) != str(first.value), second


@pytest.mark.slow
def test_rank_with_an_unwritable_feature_cache_is_refused_and_its_advice_works(
    tmp_path, torch_home, cifar10_root
):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "features").write_text("a file where the cache's folder goes")  # cannot be created
    args = [
        "rank.backbones=[cnn_small]",
        f"data.root={cifar10_root}",
        "data.download=false",
        "data.val_size=50",
        "data.fewshot.per_class=6",
    ]
    refused = cli(
        [*args, f"hydra.run.dir={tmp_path / 'a'}"],
        tmp_path,
        torch_home,
        module="transferlab.rank",
        TRANSFERLAB_CACHE=str(cache),
    )
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "is not writable" in line and "data.cache_features=false" in line
    ranked = cli(
        [*args, "data.cache_features=false", f"hydra.run.dir={tmp_path / 'b'}"],
        tmp_path,
        torch_home,
        module="transferlab.rank",
        TRANSFERLAB_CACHE=str(cache),
    )
    assert ranked.returncode == 0, ranked.stderr
    assert (tmp_path / "b" / "rank.csv").is_file()
