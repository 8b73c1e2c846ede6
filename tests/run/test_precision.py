"""trainer.precision: bf16-mixed on the CPU for every mode, `auto` resolved once and recorded,
cached features keyed by the arithmetic that made them (transferlab.run.precision)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, run_training, tiny_run

from transferlab.run.precision import check_resumed_precision, resolve_precision, same_precision
from transferlab.utils.errors import UserError

AMX = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2"})
COMPUTED = "computing the backbone features"
REUSED = "reusing cached features"
BASE = ["backbone=cnn_small", *tiny_run({"backbone": None}), "trainer.deterministic=true"]


def without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0] not in keys]


def no_cuda() -> bool:
    return False


@pytest.mark.parametrize(
    "flags, expected",
    [(AMX, "bf16-mixed"), (AVX512_BF16, "32-true"), (AVX2, "32-true"), (frozenset(), "32-true")],
)
def test_auto_is_bf16_only_on_cpus_with_amx(flags, expected):
    trainer = {"precision": "auto", "accelerator": "cpu"}
    assert resolve_precision(trainer, no_cuda, flags) == expected


@pytest.mark.parametrize(
    "given, resolved", [("32", "32-true"), ("bf16", "bf16-mixed"), ("64-true", "64-true")]
)
def test_explicit_precisions_resolve_to_their_full_names(given, resolved):
    assert resolve_precision({"precision": given, "accelerator": "cpu"}, no_cuda, AMX) == resolved


def test_an_older_fp32_run_resumes_under_a_preset_now_at_auto(monkeypatch):
    """lite0_frozen and lite0_linear_probe moved from 32-true to auto: where auto is fp32 the setting is
    the same; where it is bf16 (AMX) an older run's resume is refused (its overrides resume it as it ran)."""
    import transferlab.run.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX512_BF16)
    assert same_precision("32-true", "auto", no_cuda) and same_precision("auto", "32", no_cuda)
    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX)
    assert not same_precision("32-true", "auto", no_cuda) and same_precision("bf16-mixed", "auto", no_cuda)


def test_resume_compares_the_resolved_precision():
    check_resumed_precision(None, "bf16-mixed", "x.ckpt")  # a checkpoint from before it was recorded
    check_resumed_precision("32-true", "32-true", "x.ckpt")
    with pytest.raises(
        UserError, match="was trained in bf16-mixed, but this run would train in 32-true"
    ) as refusal:
        check_resumed_precision("bf16-mixed", "32-true", "x.ckpt")
    assert "trainer.precision=bf16-mixed" in str(refusal.value)
    assert same_precision("32", "32-true") and not same_precision("32-true", "bf16-mixed")


@pytest.mark.parametrize("mode", ["frozen", "finetune", "linear_probe", "lp_ft", "knn"])
def test_bf16_mixed_runs_every_mode_on_the_cpu_and_is_recorded(mode, cifar10_root, tmp_path):
    run_dir = tmp_path / mode
    overrides = [*BASE, f"mode={mode}", "trainer.precision=bf16-mixed", f"data.root={cifar10_root}"]
    if mode == "knn":
        overrides.append("mode.k_grid=[3]")
    if mode == "lp_ft":  # random cnn_small on noise images: the probe's head diverges at the default rate
        overrides.append("optimizer.lr=0.001")
    metrics = run_training(overrides, run_dir)
    assert 0 <= metrics["test/acc"] <= 1 and metrics["test/loss"] == metrics["test/loss"]  # finite, tested
    assert json.loads((run_dir / "run_info.json").read_text())["precision"] == "bf16-mixed"
    best = run_dir / metrics["best_checkpoint"]
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert checkpoint["transferlab"]["precision"] == "bf16-mixed"
    # the weights stay fp32 (mixed precision computes in bf16, keeps fp32 masters)
    assert all(t.dtype != torch.bfloat16 for t in checkpoint["state_dict"].values())


def test_an_fp32_run_never_reuses_bf16_features(cifar10_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    base = [*BASE, "mode=frozen", f"data.root={cifar10_root}"]
    run_training([*base, "trainer.precision=bf16-mixed"], tmp_path / "bf16")
    with caplog.at_level("INFO", logger="transferlab.data.features"):
        run_training([*base, "trainer.precision=32-true"], tmp_path / "fp32")
    assert caplog.text.count(COMPUTED) == 3 and REUSED not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="transferlab.data.features"):
        run_training([*base, "trainer.precision=bf16-mixed"], tmp_path / "bf16-again")
    assert caplog.text.count(REUSED) == 3 and COMPUTED not in caplog.text
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 6


def test_bf16_features_are_bf16_arithmetic_stored_as_fp32(cifar10_root, tmp_path, monkeypatch):
    from conftest import cifar10_datamodule

    from transferlab.data.features import extract_features
    from transferlab.models.backbones import cnn_small

    torch.manual_seed(0)
    backbone = cnn_small()
    dm = cifar10_datamodule(cifar10_root)
    fp32 = extract_features(backbone, dm, dm.val, "cpu", "32-true")
    bf16 = extract_features(backbone, dm, dm.val, "cpu", "bf16-mixed")
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # computed in bf16 ...
    assert torch.allclose(fp32, bf16, rtol=0.05, atol=0.05)  # ... the same features within its rounding


def test_auto_resolved_elsewhere_is_refused_on_resume(cifar10_root, tmp_path, monkeypatch, torch_home):
    """A run begun with trainer.precision=auto on a machine with AMX trained in bf16; resumed with the
    same config on one without, auto resolves to 32-true: refused, naming the precision to give."""
    from conftest import compose_config

    import transferlab.run.precision as precision
    from transferlab.train import run

    run_dir = tmp_path / "run"
    overrides = [*BASE, "mode=finetune", "trainer.precision=auto", f"data.root={cifar10_root}"]
    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX)
    run_training(overrides, run_dir)
    assert json.loads((run_dir / "run_info.json").read_text())["precision"] == "bf16-mixed"
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX512_BF16)
    resume = [*without(overrides, "trainer.max_epochs"), "ckpt_path=last", "trainer.max_epochs=2"]
    with pytest.raises(UserError, match="was trained in bf16-mixed, but this run would train in 32-true"):
        run(compose_config(resume, run_dir))
    fixed = [*without(resume, "trainer.precision"), "trainer.precision=bf16-mixed"]  # the fix it gives
    done = cli([*fixed, f"hydra.run.dir={run_dir}"], tmp_path, torch_home)
    assert done.returncode == 0 and "was trained in" not in done.stderr, done.stderr  # past the refusal


def test_a_resume_in_another_precision_is_refused_in_one_line(cifar10_root, tmp_path):
    from conftest import compose_config

    from transferlab.train import run

    run_dir = tmp_path / "run"
    overrides = [*BASE, "mode=finetune", "trainer.precision=bf16-mixed", f"data.root={cifar10_root}"]
    run_training(overrides, run_dir)
    changed = [
        *without(overrides, "trainer.precision", "trainer.max_epochs"),
        "trainer.precision=32-true",
        "ckpt_path=last",
        "trainer.max_epochs=2",
    ]
    with pytest.raises(UserError, match="trainer.precision"):
        run(compose_config(changed, run_dir))


def test_export_of_a_bf16_run_writes_float32_and_says_so(cifar10_root, tmp_path, capsys):
    from transferlab.export import main as export_main

    run_dir = tmp_path / "run"
    run_training(
        [*BASE, "mode=finetune", "trainer.precision=bf16-mixed", f"data.root={cifar10_root}"], run_dir
    )
    out = tmp_path / "model.pt"
    export_main([str(run_dir), "--format", "torchscript", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "precision: float32 weights and arithmetic (the run trained in bf16-mixed" in printed
    exported = torch.jit.load(str(out))
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    probabilities = exported(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert probabilities.dtype == torch.float32
