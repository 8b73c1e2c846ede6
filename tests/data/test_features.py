"""Cached embeddings for frozen backbones: same result as the uncached path, safe reuse."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli, compose_config, run_training, tiny_run

from transferlab.methods.mode_facts import mode_facts
from transferlab.utils.errors import UserError

FROZEN = [
    "experiment=vgg_frozen",
    *tiny_run({"backbone": None}),
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
]
#: VGG at 64 px (2x2 feature maps, so the global pool matters) on 40 images: seconds per run
SMALL_VGG = [
    "experiment=vgg_frozen",
    *tiny_run({"backbone": None}),
    "trainer.deterministic=true",
    "data.image_size=64",
    "data.classes=[airplane,automobile]",
    "data.fewshot.per_class=5",
    "data.val_size=10",
]
COMPUTED = "computing the backbone features"
REUSED = "reusing cached features"


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]


def _cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "features").glob("*.pt"))


@pytest.mark.slow
def test_cached_and_uncached_training_agree(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    cached = run_training(
        [*FROZEN, f"data.root={cifar10_root}", "data.cache_features=true"], tmp_path / "cached"
    )
    plain = run_training(
        [*FROZEN, f"data.root={cifar10_root}", "data.cache_features=false"], tmp_path / "plain"
    )
    assert len(_cache_files(tmp_path / "cache")) == 3  # train, val, test
    for key in ("test/acc", "test/loss", "val/acc_best", "train/loss"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-4), key
    a, b = _state(tmp_path / "cached"), _state(tmp_path / "plain")
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)  # whole model saved
    for key in a:
        if key.startswith("head."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
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
    record = torch.load(files[2], weights_only=True)
    record["features"][0, 0] = float("nan")  # its own key, but not what a backbone computes
    torch.save(record, files[2])
    with caplog.at_level("WARNING"):
        third = run_training(overrides, tmp_path / "c")
    assert "unreadable" in caplog.text and caplog.text.count("does not match") == 2
    assert third["test/acc"] == pytest.approx(first["test/acc"])
    for f in files[:3]:
        rebuilt = torch.load(f, weights_only=True)
        assert rebuilt["key"] == f.stem and torch.isfinite(rebuilt["features"]).all()  # rebuilt properly


def test_cached_checkpoint_predicts_on_images(cifar10_root, tmp_path):
    run_training([*FROZEN, f"data.root={cifar10_root}", "trainer.max_epochs=1"], tmp_path)
    from transferlab.build import build

    # The same config without the cache: the model sees images, as a user's model would.
    cfg = compose_config(
        [
            "experiment=vgg_frozen",
            f"data.root={cifar10_root}",
            "data.val_size=50",
            "data.cache_features=false",
        ],
        tmp_path / "x",
    )
    built = build(cfg, with_trainer=False)
    model, dm = built.model, built.datamodule
    assert not model.inputs_are_features
    model.load_state_dict(_state(tmp_path))
    model.eval()
    with torch.no_grad():
        probs = model(dm.preprocess(dm.test.images[:4]))
    assert probs.shape == (4, 10)


def test_cache_setting_rules(tmp_path):
    frozen, finetune = (
        mode_facts(compose_config([f"mode={m}"], tmp_path).mode) for m in ("frozen", "finetune")
    )
    assert frozen.caches_features("auto", augment=False)
    assert not frozen.caches_features("auto", augment=True)
    assert not finetune.caches_features("auto", augment=False)
    assert not frozen.caches_features(False, augment=False)
    with pytest.raises(UserError, match="augment=false"):
        frozen.caches_features(True, augment=True)
    with pytest.raises(UserError, match="mode=frozen"):
        finetune.caches_features(True, augment=False)


# ---- the cache key: a change to anything the features depend on recomputes them ----------
def _cli(args: list[str], cwd: Path, torch_home: Path, cache: Path) -> subprocess.CompletedProcess:
    return cli(args, cwd, torch_home, timeout=600, TRANSFERLAB_CACHE=str(cache))


def _job_logs(sweep: Path) -> list[str]:
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    return [(job / "train.log").read_text() for job in jobs]


def _job_metrics(sweep: Path) -> list[dict]:
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    return [json.loads((job / "metrics.json").read_text()) for job in jobs]


@pytest.fixture(scope="module")
def pool_sweep(tmp_path_factory, cifar10_root, torch_home):
    """One process, four jobs sharing one cache: pool avg, max, null, then avg again."""
    work = tmp_path_factory.mktemp("pool_sweep")
    args = [
        "-m",
        *SMALL_VGG,
        f"data.root={cifar10_root}",
        "backbone.pool=avg,max,null,avg",
        f"hydra.sweep.dir={work / 'sweep'}",
    ]
    done = _cli(args, work, torch_home, work / "cache")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return work


# (case, job, the job before it that used the same cache, whether it must reuse that job's features)
POOL_CASES = [
    ("pool avg->max", 1, 0, False),
    ("pool avg,max->null", 2, 0, False),  # 2048 features instead of 512: must fit the head
    ("pool avg again (control)", 3, 0, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, job, earlier, reuses", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_pool_is_part_of_the_cache_key(case, job, earlier, reuses, pool_sweep):
    logs, metrics = _job_logs(pool_sweep / "sweep"), _job_metrics(pool_sweep / "sweep")
    assert logs[job].count(REUSED) == (3 if reuses else 0), logs[job][-3000:]
    assert logs[job].count(COMPUTED) == (0 if reuses else 3)
    if reuses:
        assert metrics[job]["test/loss"] == pytest.approx(metrics[earlier]["test/loss"], abs=1e-6)
    else:
        assert metrics[job]["test/loss"] != pytest.approx(metrics[earlier]["test/loss"], abs=1e-6)
    # avg, max and null each have their own train/val/test files
    widths = sorted(
        torch.load(f, weights_only=True)["features"].shape[1] for f in _cache_files(pool_sweep / "cache")
    )
    assert widths == [512] * 6 + [2048] * 3


@pytest.mark.slow
def test_pixels_rewritten_in_place_are_recomputed(cifar10_root, tmp_path, monkeypatch, caplog):
    """Same file names, same labels, new pixels: the old features must not come back."""
    import shutil

    # in-process: what is tested is the cache, not the command line (the pool sweep above is one)
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    root = Path(shutil.copytree(cifar10_root, tmp_path / "data"))
    args = [*SMALL_VGG, f"data.root={root}", "backbone.pool=avg"]
    run_training(args, tmp_path / "first")

    batch_file = root / "cifar-10-batches-py" / "data_batch_1"
    with open(batch_file, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"data"] = 255 - batch[b"data"]  # every pixel changes; labels and names stay
    with open(batch_file, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    caplog.clear()
    with caplog.at_level("INFO", logger="transferlab.data.features"):
        run_training(args, tmp_path / "second")
    assert COMPUTED in caplog.text, caplog.text[-3000:]  # the training split holds images of data_batch_1
    before, after = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("first", "second"))
    assert after["train/loss"] != pytest.approx(before["train/loss"], abs=1e-6)


def test_normalization_is_part_of_the_cache_key(cifar10_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    base = [
        "backbone=cnn_small",
        "mode=frozen",
        *tiny_run({"backbone": None}),
        "trainer.deterministic=true",
        f"data.root={cifar10_root}",
    ]
    imagenet = run_training([*base, "data.normalization=imagenet"], tmp_path / "a")
    with caplog.at_level("INFO", logger="transferlab.data.features"):
        cifar = run_training([*base, "data.normalization=cifar"], tmp_path / "b")
    assert caplog.text.count(COMPUTED) == 3 and REUSED not in caplog.text
    assert cifar["test/loss"] != pytest.approx(imagenet["test/loss"], abs=1e-6)
    assert len(_cache_files(tmp_path / "cache")) == 6


def test_the_same_images_elsewhere_reuse_the_features(cifar10_root, tmp_path, monkeypatch, caplog):
    """The key is the content, not the path: a copy of the data reuses what the original computed."""
    import shutil

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    base = ["backbone=cnn_small", "mode=frozen", *tiny_run({"backbone": None}), "trainer.deterministic=true"]
    first = run_training([*base, f"data.root={cifar10_root}"], tmp_path / "a")
    copy = shutil.copytree(cifar10_root, tmp_path / "copy")
    with caplog.at_level("INFO", logger="transferlab.data.features"):
        second = run_training([*base, f"data.root={copy}"], tmp_path / "b")
    assert caplog.text.count(REUSED) == 3 and COMPUTED not in caplog.text
    assert second["test/loss"] == pytest.approx(first["test/loss"], abs=1e-6)


def test_a_cache_file_of_the_wrong_kind_is_rebuilt_with_one_log_line(tmp_path, caplog):
    import warnings

    from transferlab.data.features import _load
    from transferlab.data.subsets import Split

    split = Split(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), torch.arange(4))
    path = tmp_path / "0123abcd.pt"
    good = {"key": path.stem, "features": torch.ones(4, 5), "labels": split.labels}
    torch.save(good, path)
    assert torch.equal(_load(path, split), good["features"])
    for foreign in (torch.zeros(3), [1, 2], {**good, "labels": [0, 1, 2, 3]}, {**good, "features": "x"}):
        torch.save(foreign, path)
        caplog.clear()
        with warnings.catch_warnings(record=True) as shown, caplog.at_level("WARNING"):
            warnings.simplefilter("always")
            assert _load(path, split) is None
        assert not shown, [str(w.message) for w in shown]  # no torch warning on the way to the log line
        assert len(caplog.records) == 1 and "rebuilding it" in caplog.text
