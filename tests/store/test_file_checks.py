"""Issue 24, class 4: every file the package reads is checked against what it claims before anything
is written from it, and refused in one line naming the file and what is wrong.

Each kind of file is edited the ways another package version, a hand edit or a truncated copy
would leave it; the commands must refuse it in one `transferlab: error:` line, exit 2, and write
no output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli

from transferlab.utils.errors import UserError


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (best,) = (copy / "checkpoints").glob("best-*.ckpt")
    return copy, best


def _edit_checkpoint(path: Path, edit) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    edit(checkpoint)
    torch.save(checkpoint, path)


def _last_head_weight(state: dict) -> str:
    return sorted(k for k in state if k.startswith("head.") and k.endswith("weight"))[-1]


CHECKPOINT_EDITS = {
    # what another version of the package could write: a tensor of another shape, one missing, one extra
    "a head of another shape": (
        lambda c: c["state_dict"].__setitem__(_last_head_weight(c["state_dict"]), torch.zeros(3, 7)),
        "its weights do not fit the network it records",
    ),
    "a tensor missing": (
        lambda c: c["state_dict"].pop(sorted(k for k in c["state_dict"] if k.startswith("backbone."))[0]),
        "its weights do not fit the network it records (the checkpoint has no backbone.",
    ),
    "an extra tensor": (
        lambda c: c["state_dict"].__setitem__("backbone.extra.weight", torch.zeros(2)),
        "(the checkpoint has backbone.extra.weight, which this model lacks",
    ),
    "a value that is not a tensor": (
        lambda c: c["state_dict"].__setitem__(_last_head_weight(c["state_dict"]), "junk"),
        "is a str, not a tensor",
    ),
    # fewer class names than outputs: every prediction would be named after the wrong class
    "fewer class names": (
        lambda c: c["transferlab"]["data"].__setitem__(
            "class_names", c["transferlab"]["data"]["class_names"][:-1]
        ),
        "records 9 class names and num_classes=10 for a network of 10 outputs",
    ),
    "another num_classes": (
        lambda c: c["transferlab"].__setitem__("num_classes", 12),
        "num_classes=12 for a network of 10 outputs",
    ),
}


@pytest.mark.parametrize("edit", list(CHECKPOINT_EDITS))
def test_load_trained_refuses_a_checkpoint_that_does_not_fit_what_it_records(edit, cnn_run, tmp_path):
    from transferlab.models.trained import load_trained

    _, best = _copy_run(cnn_run, tmp_path)
    change, message = CHECKPOINT_EDITS[edit]
    _edit_checkpoint(best, change)
    with pytest.raises(UserError) as refused:
        load_trained(best, setting="RUN_DIR_OR_CKPT")
    assert message in str(refused.value) and str(best) in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("edit", ["a head of another shape", "fewer class names"])
def test_predict_and_export_refuse_it_in_one_line_and_write_nothing(
    command, edit, cnn_run, tmp_path, torch_home
):
    run, best = _copy_run(cnn_run, tmp_path)
    change, message = CHECKPOINT_EDITS[edit]
    _edit_checkpoint(best, change)
    out = tmp_path / ("preds.csv" if command == "predict" else "model.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(photos / "a.png")
    args = (
        [str(run), str(photos), "--out", str(out)]
        if command == "predict"
        else [str(run), "--format", "torchscript", "--out", str(out)]
    )
    done = cli(args, tmp_path, torch_home, module=f"transferlab.{command}")
    assert done.returncode == 2, done.stderr
    (line,) = _error_lines(done.stderr)
    assert line.startswith("transferlab: error:") and message in line and best.name in line
    assert not out.exists()


# ---- a run's JSON files -------------------------------------------------------------------------
BROKEN_JSON = {
    "truncated": '{"test/acc": 0.5, "epo',
    "binary": b"\x00\xff\x13binary",
    "a list": "[1, 2]",
}


@pytest.mark.parametrize("content", list(BROKEN_JSON))
@pytest.mark.parametrize("name", ["metrics.json", "run_info.json"])
def test_a_run_file_that_is_not_what_it_claims_is_refused_naming_it(name, content, tmp_path):
    from transferlab.store.rundir import RunDir

    run = RunDir(tmp_path)
    path = tmp_path / name
    data = BROKEN_JSON[content]
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    read = run.read_metrics if name == "metrics.json" else run.read_run_info
    with pytest.raises(UserError) as refused:
        read()
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    path.unlink()  # what the message says to do for metrics.json, and allows for run_info.json
    assert read() == {}


@pytest.mark.parametrize("content", ["{{{: [", "a: [1, 2\nb: 3", b"\x00\xff\x13binary"])
@pytest.mark.parametrize("name", ["config.yaml", "overrides.yaml"])
def test_a_saved_hydra_record_that_is_not_yaml_is_refused_naming_it(name, content, tmp_path):
    from transferlab.store.rundir import read_yaml

    path = tmp_path / ".hydra" / name
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as refused:
        read_yaml(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    path.unlink()
    assert read_yaml(path) is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("metrics.json", '{"train_time_s": "slow"}', "train_time_s='slow' is not a finite number"),
        ("metrics.json", '{"epochs": -3}', "epochs=-3 is not a finite number >= 0"),
        ("metrics.json", '{"features_time_s": NaN}', "features_time_s=nan is not a finite number"),
        ("run_info.json", '{"resumes": {"a": 1}}', "its resumes are a dict, not a list"),
    ],
)
def test_the_numbers_a_resume_adds_to_are_checked(name, content, message, tmp_path):
    from transferlab.store.rundir import RunDir

    (tmp_path / name).write_text(content)
    run = RunDir(tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run.read_metrics() if name == "metrics.json" else run.read_run_info()


@pytest.mark.slow
def test_resuming_a_run_whose_metrics_json_is_broken_is_one_line_and_the_advice_works(
    cnn_run, tmp_path, torch_home, cifar10_root
):
    from conftest import CNN_RUN

    run, _ = _copy_run(cnn_run, tmp_path)
    (run / "metrics.json").write_text('{"test/acc": 0.5, "epo')
    args = [*CNN_RUN, f"data.root={cifar10_root}", f"hydra.run.dir={run}", "ckpt_path=last"]
    done = cli(args, tmp_path, torch_home)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = _error_lines(done.stderr)
    assert "metrics.json is not valid JSON" in line and "delete it and resume with ckpt_path=last" in line
    (run / "metrics.json").unlink()  # the advice
    resumed = cli(args, tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["test/acc"] >= 0


@pytest.mark.slow
def test_resuming_a_run_whose_saved_config_is_broken_is_one_line_and_changes_nothing(
    cnn_run, tmp_path, torch_home, cifar10_root
):
    from conftest import CNN_RUN

    run, _ = _copy_run(cnn_run, tmp_path)
    (run / ".hydra").mkdir(exist_ok=True)  # a run made in-process has no Hydra record of its own
    (run / ".hydra" / "config.yaml").write_text("{{{: [")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    args = [
        *CNN_RUN,
        f"data.root={cifar10_root}",
        f"hydra.run.dir={run}",
        "ckpt_path=last",
        "trainer.max_epochs=3",
    ]
    done = cli(args, tmp_path, torch_home)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = _error_lines(done.stderr)
    assert ".hydra/config.yaml is not valid YAML (line 1)" in line and "start a new run dir" in line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "name, content",
    [
        ("run_info.json", "not json"),
        ("fewshot_indices.json", '{"per_class": "ten"}'),
        ("fewshot_indices.json", b"\x00\x01"),
    ],
)
def test_the_report_lists_a_run_with_a_broken_file_as_failed_naming_the_file(name, content, tmp_path):
    from transferlab.report.runs import load_finished

    good, bad = tmp_path / "good", tmp_path / "bad"
    for run in (good, bad):
        run.mkdir()
        (run / "metrics.json").write_text('{"test/acc": 0.5, "val/acc_best": 0.5}')
    (bad / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    runs, broken = load_finished([good, bad])
    assert [r.path for r in runs] == [good]
    (failed,) = broken
    assert name in failed.error


# ---- rank.csv, before report.md is written ------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "is not a text table"),
        (
            b"backbone,weights,logme,h_score,leep,nce\na,x,1.0,2.0\n",
            "line 2: not as many cells as the header",
        ),
        (
            b"backbone,weights,logme,h_score,leep,nce\na,x,1.0,2.0,,nan\nb,y,0.5,1",
            "line 3: not as many cells",
        ),
    ],
)
def test_report_refuses_a_rank_csv_it_cannot_read_before_writing_report_md(
    content, message, tmp_path, capsys
):
    from transferlab.report.__main__ import main

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"test/acc": 0.5, "val/acc_best": 0.5}')
    rank = tmp_path / "rank.csv"
    rank.write_bytes(content)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "runs"), "--rank", str(rank), "--out", str(out)])
    assert exited.value.code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert message in line and str(rank) in line
    assert not (out / "report.md").exists()
