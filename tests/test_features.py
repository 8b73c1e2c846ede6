"""Cached embeddings for frozen backbones: same result as the uncached path, safe reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_config, run_training
from transferlab.errors import UserError
from transferlab.features import should_cache

FROZEN = ["experiment=vgg_frozen", *FAST, "trainer.max_epochs=2", "trainer.deterministic=true"]


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "features").glob("*.pt"))


def test_cached_and_uncached_training_agree(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    cached = run_training([*FROZEN, f"data.root={cifar10_root}", "data.cache_features=true"], tmp_path / "cached")
    plain = run_training([*FROZEN, f"data.root={cifar10_root}", "data.cache_features=false"], tmp_path / "plain")
    assert len(_cache_files(tmp_path / "cache")) == 3  # train, val, test
    for key in ("test/acc", "test/loss", "val/acc_best", "train/loss"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-4), key
    a, b = _state(tmp_path / "cached"), _state(tmp_path / "plain")
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)  # whole model saved
    for key in a:
        if key.startswith("head."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_cache_is_reused_and_damaged_files_are_rebuilt(cifar10_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    overrides = [*FROZEN, f"data.root={cifar10_root}", "trainer.max_epochs=1"]
    first = run_training(overrides, tmp_path / "a")
    files = _cache_files(tmp_path / "cache")
    stamps = [f.stat().st_mtime_ns for f in files]

    second = run_training(overrides, tmp_path / "b")  # reused: nothing rewritten
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert second["test/acc"] == pytest.approx(first["test/acc"])

    files[0].write_bytes(b"truncated")  # corrupted
    record = torch.load(files[1], weights_only=True)
    record["key"] = "something else"  # stale: written for other data
    torch.save(record, files[1])
    with caplog.at_level("WARNING"):
        third = run_training(overrides, tmp_path / "c")
    assert "unreadable" in caplog.text and "does not match" in caplog.text
    assert third["test/acc"] == pytest.approx(first["test/acc"])
    for f in files[:2]:
        assert torch.load(f, weights_only=True)["key"] == f.stem  # rebuilt properly


def test_cached_checkpoint_predicts_on_images(cifar10_root, tmp_path):
    run_training([*FROZEN, f"data.root={cifar10_root}", "trainer.max_epochs=1"], tmp_path)
    from transferlab.train import build_datamodule
    import hydra

    cfg = compose_config(["experiment=vgg_frozen", f"data.root={cifar10_root}", "data.val_size=50"], tmp_path / "x")
    backbone = hydra.utils.instantiate(cfg.backbone, image_size=32)
    dm = build_datamodule(cfg, backbone, tmp_path / "x")
    head = hydra.utils.instantiate(cfg.head, in_features=backbone.out_features, num_classes=10)
    from transferlab import TransferModule

    model = TransferModule(backbone, head, num_classes=10)
    model.load_state_dict(_state(tmp_path))
    model.eval()
    with torch.no_grad():
        probs = model(dm.preprocess(dm.test.images[:4]))
    assert probs.shape == (4, 10)


def test_cache_setting_rules():
    assert should_cache("auto", "frozen", augment=False)
    assert not should_cache("auto", "frozen", augment=True)
    assert not should_cache("auto", "finetune", augment=False)
    assert not should_cache(False, "frozen", augment=False)
    with pytest.raises(UserError, match="augment=false"):
        should_cache(True, "frozen", augment=True)
    with pytest.raises(UserError, match="mode=frozen"):
        should_cache(True, "finetune", augment=False)
