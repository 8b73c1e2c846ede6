"""A run nobody watches (no terminal: no progress bar) still says how each epoch went in train.log."""

from __future__ import annotations

import re

from conftest import cli, tiny_run


def test_each_epoch_writes_one_line_to_train_log(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny_run(), "trainer.max_epochs=2", f"data.root={cifar10_root}", f"hydra.run.dir={run_dir}"]
    done = cli(args, tmp_path, torch_home)
    assert done.returncode == 0, done.stderr
    lines = [l for l in (run_dir / "train.log").read_text().splitlines() if re.search(r"epoch \d+/2:", l)]
    assert [re.search(r"epoch (\d)/2", l).group(1) for l in lines] == ["1", "2"]
    # the numbers are the epoch's own, as metrics.json reports the last one
    assert all(re.search(r"train/loss=\d+\.\d{4} .*val/acc=\d\.\d{4}", l) for l in lines), lines
