"""A non-editable install (a wheel) carries the configs, so the command works from any folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, cli_env


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("transferlab-*.whl")
    site = out / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what `pip install` would put in site-packages
    return wheel, site


def test_wheel_contains_the_configs(wheel_site):
    wheel, _ = wheel_site
    names = zipfile.ZipFile(wheel).namelist()
    assert "transferlab/conf/train.yaml" in names
    assert "transferlab/conf/experiment/vgg_finetune.yaml" in names


@pytest.mark.slow
def test_installed_copy_composes_from_another_folder(wheel_site, torch_home, tmp_path):
    _, site = wheel_site
    env = cli_env(torch_home, PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-c", "import transferlab.config as r; print(r.__file__); print(r.config_dir())"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, conf = result.stdout.split()
    assert module_file.startswith(str(site)) and conf == str(site / "transferlab" / "conf")
    result = subprocess.run(
        [sys.executable, "-m", "transferlab", "experiment=vgg_frozen", "--cfg", "job"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "name: vgg11_bn" in result.stdout and "name: frozen" in result.stdout
