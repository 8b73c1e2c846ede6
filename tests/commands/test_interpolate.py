"""`python -m transferlab.interpolate START FINETUNED --out DIR` (WiSE-FT, issue 21): the ends of the
interpolation are the two runs, the chosen network is a run that predict and report read, the
corruption eval and the temperature follow FINETUNED's settings, and bad pairs and options are
refused in one line before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, tiny_run

from transferlab.store.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

#: two corruptions at two severities on 60 of the tiny test split's images
EVAL = ["eval.corruptions=[gaussian_noise,contrast]", "eval.severities=[1,5]", "eval.images=60"]


def _run(root: Path, *changes: str) -> list[str]:
    return [
        *tiny_run(
            {"backbone": "efficientnet_lite0"}
        ),  # the test's stand-in ImageNet weights: a pretrained start
        f"data.root={root}",
        "data.download=false",
        "seed=3",
        *changes,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar10_root, torch_home, transferlab_cache) -> dict[str, Path]:
    """A linear probe, a fine-tuned run (corruptions evaluated, temperature fitted), an lp_ft run and a
    scratch run, on the same tiny data and seed."""
    base = tmp_path_factory.mktemp("wise_runs")
    made = {}
    for name, changes in {
        "probe": ["mode=linear_probe", "mode.l2_grid=[0.01,1]"],
        "finetune": ["mode=finetune", "calibration=auto", *EVAL],
        "lp_ft": ["mode=lp_ft", "mode.l2_grid=[0.01,1]", "optimizer.lr=1e-3", "trainer.max_epochs=2"],
        "scratch": ["mode=scratch"],
    }.items():
        made[name] = _train(_run(cifar10_root, *changes), base / name, torch_home, transferlab_cache)
    return made


def _train(overrides: list[str], run_dir: Path, torch_home: Path, cache: Path) -> Path:
    """A run made as the user makes it (Hydra writes the .hydra/ record interpolate reads)."""
    result = cli(
        [*overrides, f"hydra.run.dir={run_dir}"], run_dir.parent, torch_home, TRANSFERLAB_CACHE=str(cache)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _interpolate(args: list, cwd: Path, torch_home: Path):
    return cli([str(a) for a in args], cwd, torch_home, module="transferlab.interpolate")


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _rows(folder: Path) -> list[dict]:
    with open(folder / "interpolate.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_the_ends_reproduce_both_runs_and_the_chosen_network_is_a_run(runs, tmp_path, torch_home):
    out = tmp_path / "wise"
    result = _interpolate(
        [runs["probe"], runs["finetune"], "--out", out, "--alphas", "0,0.5,1", "--no-bn-recompute"],
        tmp_path,
        torch_home,
    )
    assert result.returncode == 0, result.stderr
    # finetune's head started from random weights, not from the probe's: said once, and recorded
    assert result.stderr.count("warning:") == 1 and "head" in result.stderr
    rows = {float(r["alpha"]): r for r in _rows(out)}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    # with the statistics left alone, alpha 0 is START and alpha 1 is FINETUNED, image for image
    assert float(rows[0.0]["test/acc"]) == pytest.approx(
        _metrics(runs["probe"])["test/acc"], abs=1e-6
    )  # float32 in metrics.json; one image is 0.01
    assert float(rows[1.0]["test/acc"]) == pytest.approx(
        _metrics(runs["finetune"])["test/acc"], abs=1e-6
    )  # float32 in metrics.json; one image is 0.01
    # FINETUNED's eval.* settings: test_c per alpha, and alpha 1's is FINETUNED's own
    assert float(rows[1.0]["test_c/acc"]) == pytest.approx(
        _metrics(runs["finetune"])["test_c/acc"], abs=1e-6
    )  # float32 in metrics.json; one image is 0.01
    metrics = _metrics(out)
    chosen = [r for r in rows.values() if r["chosen"] == "true"]
    assert len(chosen) == 1 and metrics["alpha"] == float(chosen[0]["alpha"])
    # chosen on validation: no other alpha has more correct validation images
    assert float(chosen[0]["val/acc"]) == max(float(r["val/acc"]) for r in rows.values())
    assert metrics["best_checkpoint"] == "checkpoints/best-wise.ckpt"
    assert {"test_c/acc", "test_c/acc/contrast/5", "test_c/acc/severity1"} <= set(metrics)
    # FINETUNED was calibrated (calibration=auto): the chosen network gets its own temperature
    assert metrics["temperature"] > 0 and "test/ece_calibrated" in metrics
    record = torch.load(RunDir(out).wise, map_location="cpu", weights_only=False)["transferlab"]
    assert record["temperature"] == metrics["temperature"] and record["wise_ft"]["alpha"] == metrics["alpha"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["eval"]["corruptions"] == ["gaussian_noise", "contrast"] and info["bn_recompute"] is False
    assert (out / "interpolate.md").read_text().count("\n| ") == 4 and (
        out / "interpolate.png"
    ).stat().st_size

    # predict and report read the interpolated run as any other
    image = tmp_path / "one.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    predicted = cli(
        [str(out), str(image), "--out", str(tmp_path / "p.csv")],
        tmp_path,
        torch_home,
        module="transferlab.predict",
    )
    assert predicted.returncode == 0, predicted.stderr
    assert "temperature" in (predicted.stdout + predicted.stderr).lower()
    reported = cli(
        [str(out), "--out", str(tmp_path / "report")], tmp_path, torch_home, module="transferlab.report"
    )
    assert reported.returncode == 0, reported.stderr
    assert "wise_ft" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_batchnorm_statistics_are_reestimated_between_the_ends(runs, tmp_path, torch_home):
    out = tmp_path / "wise"
    result = _interpolate(
        [runs["probe"], runs["finetune"], "--out", out, "--alphas", "0,0.5,1", "--no-corruptions"],
        tmp_path,
        torch_home,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "run_info.json").read_text())
    assert info["bn_layers_recomputed"] > 0 and info["bn_images"] > 0 and info["eval"] is None
    rows = {float(r["alpha"]): r for r in _rows(out)}
    assert "test_c/acc" not in rows[0.5]  # --no-corruptions
    # the ends are the runs as trained, re-estimation or not
    assert float(rows[0.0]["test/acc"]) == pytest.approx(
        _metrics(runs["probe"])["test/acc"], abs=1e-6
    )  # float32 in metrics.json; one image is 0.01
    mixed = torch.load(RunDir(out).wise, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in mixed.values() if v.is_floating_point())


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_an_lp_ft_runs_probe_state_and_its_fine_tuned_network_pair_without_a_warning(
    runs, tmp_path, torch_home
):
    lp_ft = RunDir(runs["lp_ft"])
    out = tmp_path / "wise"
    result = _interpolate(
        [lp_ft.probe_state, lp_ft.last, "--out", out, "--alphas", "0,1"], tmp_path, torch_home
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert json.loads((out / "run_info.json").read_text())["head_started_from_start"] is True


def _one_line_refusal(result, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "alphas, words",
    [
        ("-0.1", "outside [0, 1]"),
        ("-0.1,1", "outside [0, 1]"),  # a list that starts with "-": argparse took it for an option
        ("0,1.5", "outside [0, 1]"),
        ("nan", "outside [0, 1]"),
        ("inf", "outside [0, 1]"),
        ("0,half", "'half' is not a number"),
        ("0,,1", "empty entry"),
        ("", "empty entry"),
        ("0.5,0.5", "given twice"),
    ],
)
def test_bad_alphas_are_refused_in_one_line(tmp_path, torch_home, alphas, words):
    # refused from the command line alone: the runs named are never read
    out = tmp_path / "wise"
    result = _interpolate(
        [tmp_path / "probe", tmp_path / "finetune", "--out", out, "--alphas", alphas], tmp_path, torch_home
    )
    _one_line_refusal(result, words)
    assert not out.exists()


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_pairs_that_do_not_mix_are_refused_in_one_line(runs, tmp_path, torch_home, cifar10_root):
    out = tmp_path / "wise"
    lp_ft = RunDir(runs["lp_ft"])
    cases = [
        ([runs["probe"], runs["scratch"]], "scratch"),
        ([runs["scratch"], runs["finetune"]], "scratch"),
        ([runs["probe"], runs["probe"]], "same checkpoint"),
        ([lp_ft.probe_state, lp_ft.probe_state], "probe state"),
        ([runs["finetune"], runs["probe"]], "START"),  # the roles swapped: START trained its backbone
        ([tmp_path / "missing", runs["finetune"]], "does not exist"),
    ]
    for sources, words in cases:
        _one_line_refusal(_interpolate([*sources, "--out", out], tmp_path, torch_home), words)
        assert not out.exists()


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_runs_on_other_data_are_refused(runs, tmp_path, torch_home, cifar10_root, transferlab_cache):
    other = _train(
        _run(cifar10_root, "mode=finetune", "data.fewshot.per_class=5"),
        tmp_path / "other",
        torch_home,
        transferlab_cache,
    )
    out = tmp_path / "wise"
    result = _interpolate([runs["probe"], other, "--out", out], tmp_path, torch_home)
    _one_line_refusal(result)
    assert "fewshot" in result.stderr or "training images" in result.stderr
    assert not out.exists()


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_an_existing_out_is_kept_unless_forced_and_a_source_is_never_the_out(runs, tmp_path, torch_home):
    out = tmp_path / "wise"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [runs["probe"], runs["finetune"], "--alphas", "0,1", "--no-corruptions"]
    _one_line_refusal(_interpolate([*args, "--out", out], tmp_path, torch_home), "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    for inside in (runs["finetune"], runs["probe"] / "checkpoints", runs["finetune"] / "sub"):
        before = sorted(p.name for p in Path(runs["finetune"]).rglob("*"))
        _one_line_refusal(_interpolate([*args, "--out", inside, "--force"], tmp_path, torch_home))
        assert sorted(p.name for p in Path(runs["finetune"]).rglob("*")) == before
    # --force replaces an earlier interpolation, leaving the user's own file
    assert _interpolate([*args, "--out", out, "--force"], tmp_path, torch_home).returncode == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json").is_file()


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_a_training_run_dir_is_not_an_interpolation_dir(runs, tmp_path, torch_home):
    copy = tmp_path / "trained"
    shutil.copytree(runs["scratch"], copy)
    result = _interpolate([runs["probe"], runs["finetune"], "--out", copy, "--force"], tmp_path, torch_home)
    _one_line_refusal(result, "training run")


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_a_run_that_has_not_finished_is_refused(runs, tmp_path, torch_home):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["finetune"], unfinished)
    (unfinished / "metrics.json").unlink()
    out = tmp_path / "wise"
    _one_line_refusal(
        _interpolate([runs["probe"], unfinished, "--out", out], tmp_path, torch_home), "has not finished"
    )
    assert not out.exists()


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_a_copied_run_whose_best_checkpoint_is_gone_never_reads_the_originals(runs, tmp_path, torch_home):
    copy = tmp_path / "copy"
    shutil.copytree(runs["finetune"], copy)
    best = json.loads((copy / "metrics.json").read_text())["best_checkpoint"]
    (copy / best).unlink()  # the original run still has its file, at the path last.ckpt recorded
    out = tmp_path / "wise"
    result = _interpolate([runs["probe"], copy, "--out", out], tmp_path, torch_home)
    _one_line_refusal(result, "is missing from", "last.ckpt")
    assert not out.exists() and (runs["finetune"] / best).is_file()


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_data_that_cannot_be_read_is_refused_with_the_fix_this_command_takes(
    runs, tmp_path, torch_home, cifar10_root
):
    empty, unrelated = tmp_path / "empty", tmp_path / "unrelated"
    empty.mkdir()
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("not a dataset")
    args = [runs["probe"], runs["finetune"], "--alphas", "0,1", "--no-corruptions"]
    for root in (empty, unrelated):
        out = tmp_path / f"wise_{root.name}"
        result = _interpolate([*args, "--out", out, "--data-root", root], tmp_path, torch_home)
        _one_line_refusal(result, "--data-root", str(root))
        assert "data.download" not in result.stderr and not out.exists()
    # the fix the line names, applied
    result = _interpolate(
        [*args, "--out", tmp_path / "wise", "--data-root", cifar10_root], tmp_path, torch_home
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # the module's trained runs (about two minutes, shared by these tests)
def test_checkpoints_copied_into_a_plain_folder_are_read_and_only_that_folder_is_refused(
    runs, tmp_path, torch_home, cifar10_root
):
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("probe", "finetune"):
        shutil.copy(runs[name] / _metrics(runs[name])["best_checkpoint"], loose / f"{name}.ckpt")
    args = ["probe.ckpt", "finetune.ckpt", "--alphas", "0,1", "--no-corruptions", "--data-root", cifar10_root]
    _one_line_refusal(_interpolate([*args, "--out", "."], loose, torch_home), "holds START's checkpoint")
    result = _interpolate([*args, "--out", "wise"], loose, torch_home)  # a new folder beside them
    assert result.returncode == 0, result.stderr
    assert (loose / "wise" / "metrics.json").is_file()
    assert sorted(p.name for p in loose.iterdir()) == ["finetune.ckpt", "probe.ckpt", "wise"]
