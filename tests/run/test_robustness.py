"""Corruption robustness after the test (`conf/eval/`, transferlab/run/robustness.py): the settings,
the stratified subset, and runs that write test_c/* (issue 21)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CNN_RUN, cli, compose_config, run_training

from transferlab.data.subsets import stratified_subset
from transferlab.store.rundir import RunDir
from transferlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

#: two corruptions at two severities on 60 of the tiny test split's images
EVAL = ["eval.corruptions=[gaussian_noise,contrast]", "eval.severities=[1,5]", "eval.images=60"]


# ---- the settings, refused before anything is built ------------------------------------------------
BAD_SETTINGS = [
    ("not-a-list", ["eval.corruptions=3"], "eval.corruptions=3 must be a list of corruption names"),
    ("unknown-name", ["eval.corruptions=[gaussian_nois]"], "'gaussian_nois' is not a corruption; did you mean gaussian_noise?"),
    ("repeated-name", ["eval.corruptions=[fog,fog]"], "eval.corruptions lists fog more than once"),
    ("all-in-a-list", ["eval.corruptions=[all,fog]"], "all stands for the whole list"),
    ("severity-0", ["eval.corruptions=[fog]", "eval.severities=[0]"], "eval.severities: 0 is not a severity"),
    ("severity-6", ["eval.corruptions=[fog]", "eval.severities=[1,6]"], "eval.severities: 6 is not a severity"),
    ("severity-float", ["eval.corruptions=[fog]", "eval.severities=[2.5]"], "eval.severities: 2.5 is not a severity"),
    ("severity-text", ["eval.corruptions=[fog]", "eval.severities=['3']"], "eval.severities: '3' is not a severity"),
    ("severity-bool", ["eval.corruptions=[fog]", "eval.severities=[true]"], "eval.severities: True is not a severity"),
    ("severities-empty", ["eval.corruptions=[fog]", "eval.severities=[]"], "must be a non-empty list of severities"),
    ("severity-repeated", ["eval.corruptions=[fog]", "eval.severities=[3,3]"], "repeats a severity"),
    ("images-0", ["eval.corruptions=[fog]", "eval.images=0"], "eval.images=0 must be a positive number of test images"),
    ("images-float", ["eval.corruptions=[fog]", "eval.images=2.5"], "eval.images=2.5 must be a positive number"),
    ("images-bool", ["eval.corruptions=[fog]", "eval.images=true"], "eval.images=True must be a positive number"),
    ("seed-negative", ["eval.corruptions=[fog]", "eval.seed=-1"], "eval.seed=-1 must be an integer from 0 to"),
    ("seed-huge", ["eval.corruptions=[fog]", "eval.seed=4294967296"], "eval.seed=4294967296 must be an integer"),
    ("unknown-key", ["+eval.severity=3"], "eval.severity is not an eval setting"),
    ("no-test", ["eval=corruptions", "test=false"], "eval.corruptions tests the tested checkpoint on corrupted images"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message", [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS]
)
def test_bad_eval_settings_are_refused_before_anything_is_built(overrides, message, tmp_path):
    from transferlab.build import check_config

    with pytest.raises(UserError, match=re.escape(message)):
        check_config(compose_config(["backbone=cnn_small", *overrides], tmp_path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_corruption_that_is_not_implemented_is_refused_with_the_reason(tmp_path):
    from transferlab.data.corruptions import OMITTED
    from transferlab.run.robustness import eval_settings

    for name, reason in OMITTED.items():
        node = compose_config([f"eval.corruptions=[{name}]"], tmp_path).eval
        with pytest.raises(UserError, match=re.escape(f"{name} is not implemented here ({reason})")):
            eval_settings(node)


def test_all_and_the_preset_and_the_default(tmp_path):
    from transferlab.data.corruptions import CORRUPTIONS
    from transferlab.run.robustness import eval_settings

    assert eval_settings(compose_config([], tmp_path).eval) is None  # the default: no corruption
    assert eval_settings(None) is None  # a config recorded before the group existed
    everything = eval_settings(compose_config(["eval.corruptions=all"], tmp_path).eval)
    assert everything.corruptions == tuple(CORRUPTIONS) and everything.severities == (1, 2, 3, 4, 5)
    preset = eval_settings(compose_config(["eval=corruptions"], tmp_path).eval)
    assert preset.pairs == [(c, s) for c in preset.corruptions for s in (1, 3, 5)] and preset.images == 2000
    one = eval_settings(compose_config(["eval.corruptions=fog", "eval.severities=3"], tmp_path).eval)
    assert one.pairs == [("fog", 3)]


def test_a_bad_eval_setting_is_one_line_exit_2_through_the_command_line(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    args = [*CNN_RUN, f"data.root={cifar10_root}", "eval.corruptions=[fogg]", f"hydra.run.dir={run_dir}"]
    result = cli(args, tmp_path, torch_home)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "transferlab: error: eval.corruptions: 'fogg' is not a corruption; did you mean fog?"
    )
    assert not RunDir(run_dir).checkpoints.exists()


def test_more_eval_images_than_the_test_split_is_refused_before_training(cifar10_root, tmp_path):
    with pytest.raises(UserError, match=r"eval.images=100000 but the test split has \d+ images"):
        run_training(
            [*CNN_RUN, f"data.root={cifar10_root}", "eval.corruptions=[fog]", "eval.images=100000"], tmp_path
        )
    assert not RunDir(tmp_path).checkpoints.exists()
    with pytest.raises(UserError, match=r"eval.images=3 is fewer than the 10 classes"):
        run_training(
            [*CNN_RUN, f"data.root={cifar10_root}", "eval.corruptions=[fog]", "eval.images=3"], tmp_path
        )


# ---- the stratified subset -----------------------------------------------------------------------
def test_the_stratified_subset_keeps_the_class_balance_and_is_fixed_by_its_seed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    chosen = stratified_subset(labels, 10, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [5, 3, 2]
    assert torch.equal(chosen, stratified_subset(labels, 10, seed=0))
    assert not torch.equal(chosen, stratified_subset(labels, 10, seed=1))
    assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == 10
    odd = stratified_subset(labels, 7, seed=0)  # 3.5, 2.1, 1.4: the largest remainders get the 1 left
    assert torch.bincount(labels[odd], minlength=3).tolist() == [4, 2, 1]
    assert torch.equal(stratified_subset(labels, 100, seed=3), torch.arange(100))
    with pytest.raises(ValueError):
        stratified_subset(labels, 0, seed=0)


# ---- runs ---------------------------------------------------------------------------------------
def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _pair_keys(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if re.fullmatch(r"test_c/acc/[a-z_]+/\d", k)}


def test_a_run_with_corruptions_writes_every_pair_their_means_and_its_record(cifar10_root, tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_training([*CNN_RUN, f"data.root={cifar10_root}", *EVAL], run_dir)
    pairs = _pair_keys(metrics)
    assert sorted(pairs) == [f"test_c/acc/{c}/{s}" for c in ("contrast", "gaussian_noise") for s in (1, 5)]
    assert metrics["test_c/acc"] == pytest.approx(sum(pairs.values()) / 4)
    for s in (1, 5):
        both = (metrics[f"test_c/acc/gaussian_noise/{s}"] + metrics[f"test_c/acc/contrast/{s}"]) / 2
        assert metrics[f"test_c/acc/severity{s}"] == pytest.approx(both)
    assert metrics["test_c/images"] == 60 and 0 <= metrics["test_c/clean_acc"] <= 1
    info = json.loads(RunDir(run_dir).run_info.read_text())
    assert info["eval"]["corruptions"] == ["gaussian_noise", "contrast"] and info["eval"]["images"] == 60
    assert "CIFAR-10-C-style" in info["eval"]["implementation"]


def test_on_the_whole_test_split_the_clean_accuracy_is_the_tests(cifar10_root, tmp_path):
    """The corruption pass is the test's own forward pass: on all test images (eval.images=null) its
    clean accuracy is test/acc; for a head on cached features (frozen) too, whose corrupted images'
    features are computed, and cached: a second run reads them and gets the same numbers."""
    one = ["eval.corruptions=[pixelate]", "eval.severities=[2]"]
    finetuned = run_training([*CNN_RUN, f"data.root={cifar10_root}", *one], tmp_path / "ft")
    assert finetuned["test_c/clean_acc"] == pytest.approx(finetuned["test/acc"], abs=1e-6)
    assert finetuned["test_c/images"] == finetuned["test/images"]
    frozen = [*CNN_RUN, f"data.root={cifar10_root}", "mode=frozen", *one]
    first = run_training(frozen, tmp_path / "frozen")
    assert first["test_c/clean_acc"] == pytest.approx(first["test/acc"], abs=1e-6)
    cached = {p.name for p in (Path(_cache()) / "features").glob("*.pt")}
    second = run_training(frozen, tmp_path / "frozen2")
    assert {p.name for p in (Path(_cache()) / "features").glob("*.pt")} == cached  # nothing new computed
    assert second["test_c/acc/pixelate/2"] == first["test_c/acc/pixelate/2"]


def _cache() -> str:
    import os

    return os.environ["TRANSFERLAB_CACHE"]


def test_corrupted_images_are_cached_and_a_damaged_cache_file_is_recomputed(tmp_path, monkeypatch):
    from transferlab.run.robustness import corrupted_images

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))  # this test's own, empty cache

    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    first = corrupted_images(images, "gaussian_noise", 3, seed=0, use_disk=True)
    (path,) = (Path(_cache()) / "corruptions").glob("*.pt")
    assert torch.equal(corrupted_images(images, "gaussian_noise", 3, seed=0, use_disk=True), first)
    path.write_bytes(b"not a tensor file")
    assert torch.equal(corrupted_images(images, "gaussian_noise", 3, seed=0, use_disk=True), first)
    assert len(list((Path(_cache()) / "corruptions").glob("*.pt"))) == 1
    for foreign in (torch.zeros(3), [1, 2], {"key": "other", "images": first}):  # files of the wrong kind
        torch.save(foreign, path)
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            assert torch.equal(corrupted_images(images, "gaussian_noise", 3, seed=0, use_disk=True), first)
        assert not shown, [str(w.message) for w in shown]  # the one log line, no torch warning on the way
    other_seed = corrupted_images(images, "gaussian_noise", 3, seed=1, use_disk=True)
    assert (
        not torch.equal(other_seed, first) and len(list((Path(_cache()) / "corruptions").glob("*.pt"))) == 2
    )


def test_a_finished_run_resumed_with_corruptions_evaluates_only_them(cnn_run, cifar10_root, tmp_path):
    from transferlab.run.resume import check_resume

    run_dir = tmp_path / "run"
    shutil.copytree(cnn_run, run_dir)  # the shared run stays as it is
    before = _metrics(run_dir)
    resume = [*CNN_RUN, f"data.root={cifar10_root}", "ckpt_path=last"]
    assert check_resume(compose_config(resume, run_dir), run_dir).nothing_to_do
    assert not check_resume(compose_config([*resume, *EVAL], run_dir), run_dir).nothing_to_do

    run_training([*resume, *EVAL], run_dir)
    metrics = _metrics(run_dir)
    assert "test_c/acc" in metrics and len(_pair_keys(metrics)) == 4
    for key in ("train/loss", "val/acc_best", "epochs", "train_time_s", "best_checkpoint"):
        assert metrics[key] == before[key]  # nothing trained
    assert metrics["test/acc"] == pytest.approx(before["test/acc"], abs=1e-6)
    assert check_resume(compose_config([*resume, *EVAL], run_dir), run_dir).nothing_to_do  # evaluated now

    # other settings: a new evaluation replaces the earlier one, never mixed with it
    other = ["eval.corruptions=[fog]", "eval.severities=[2]", "eval.images=60"]
    assert not check_resume(compose_config([*resume, *other], run_dir), run_dir).nothing_to_do
    run_training([*resume, *other], run_dir)
    metrics = _metrics(run_dir)
    assert list(_pair_keys(metrics)) == ["test_c/acc/fog/2"]
    assert metrics["test_c/acc"] == metrics["test_c/acc/fog/2"] and "test_c/acc/severity5" not in metrics
    assert json.loads(RunDir(run_dir).run_info.read_text())["eval"]["corruptions"] == ["fog"]


def test_the_report_says_what_test_c_is_and_when_runs_differ_or_lack_it():
    from types import SimpleNamespace

    from transferlab.report.tables import corruption_lines

    record = {"corruptions": ["fog"], "severities": [1], "images": 60, "seed": 0, "implementation": "v1"}

    def run(name, evaluation, test_c=True):
        metrics = {"test/acc": 0.5, **({"test_c/acc": 0.4} if test_c else {})}
        return SimpleNamespace(name=name, metrics=metrics, evaluation=evaluation)

    same = corruption_lines([run("a", record), run("b", dict(record))])
    assert len(same) == 1 and "fog at severities 1, 60 test images, seed 0" in same[0]
    lacking = corruption_lines([run("a", record), run("probe", None, test_c=False)])
    assert (
        "differ" not in " ".join(lacking)
        and "1 tested run(s) were not evaluated on corruptions** (probe)" in lacking[1]
    )
    differ = corruption_lines([run("a", record), run("b", {**record, "seed": 1})])
    assert len(differ) == 1 and "Corruption evaluations differ between runs" in differ[0]
    assert corruption_lines([run("probe", None, test_c=False)]) == []
