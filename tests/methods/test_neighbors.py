"""mode=knn and mode=ncm (issue 21, item 1): against hand-computed examples, and as runs that
predict and export read like any other."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from conftest import cli, compose_config, run_training, tiny_run

from transferlab.methods.neighbors import NeighborClassifier, choose_k, training_metrics
from transferlab.models.heads import KNN_PROBABILITY_FLOOR, KnnHead, NcmHead
from transferlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

#: four stored training images in 2-D, two classes
MEMORY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
MEMORY_LABELS = torch.tensor([0, 1, 1, 0])


def test_knn_votes_with_temperature_weighted_cosine_similarity_by_hand():
    head = KnnHead(2, 3, memory_size=4, k=2, temperature=0.5)
    head.store(MEMORY * 3.0, MEMORY_LABELS)  # stored normalized: the scale of a feature does not matter
    query = torch.tensor([[2.0, 1.0]])
    # cosine similarities to the four: 2/sqrt5, 1/sqrt5, 3/sqrt10, -2/sqrt5 -> the 2 nearest are
    # image 2 (class 1, 0.9487) and image 0 (class 0, 0.8944)
    s2, s0 = 3 / math.sqrt(10), 2 / math.sqrt(5)
    w1, w0 = math.exp(s2 / 0.5), math.exp(s0 / 0.5)
    votes = [w0 / (w0 + w1), w1 / (w0 + w1), 0.0]  # class 2 gets no vote: floored, then renormalized
    floored = [max(v, KNN_PROBABILITY_FLOOR) for v in votes]
    expected = torch.tensor([[v / sum(floored) for v in floored]])
    probabilities = head(query).softmax(dim=1)  # the logits are the log-probabilities
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-7)
    assert math.isfinite(torch.nn.functional.cross_entropy(head(query), torch.tensor([2])).item())


def test_knn_ties_go_to_the_image_stored_first():
    head = KnnHead(2, 2, memory_size=2, k=1, temperature=0.07)
    head.store(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0]))  # the same point, two labels
    queries = torch.tensor([[5.0, 0.0], [1.0, 0.1]])
    assert head(queries).argmax(1).tolist() == [1, 1]
    # exported to ONNX (TopK there, no stable sort): the same tie-break
    onnxruntime = pytest.importorskip("onnxruntime")
    import io

    buffer = io.BytesIO()
    torch.onnx.export(head, queries, buffer, opset_version=17, dynamo=False, input_names=["x"])
    session = onnxruntime.InferenceSession(buffer.getvalue())
    (logits,) = session.run(None, {"x": queries.numpy()})
    assert logits.argmax(1).tolist() == [1, 1]


def test_ncm_is_a_softmax_of_cosine_similarity_to_normalized_class_means_by_hand():
    head = NcmHead(2, 3, temperature=0.1)
    head.store(MEMORY, MEMORY_LABELS)
    # class 0: normalize([1,0]) + normalize([-1,0]) = [0,0] -> a zero mean; class 1: [0,1] + [1,1]/sqrt2
    mean1 = torch.tensor([1 / math.sqrt(2), 1 + 1 / math.sqrt(2)])
    mean1 = mean1 / mean1.norm()
    torch.testing.assert_close(head.means, torch.stack([torch.zeros(2), mean1, torch.zeros(2)]))
    query = torch.tensor([[0.0, 2.0]])
    expected = torch.tensor([[0.0, float(mean1[1]) / 0.1, 0.0]])
    torch.testing.assert_close(head(query), expected)


def test_k_is_chosen_on_validation_capped_at_the_training_set_and_ties_go_to_the_smaller_k():
    # class 0 around +x, class 1 around +y, and one class-1 outlier at +x: k=1 misreads a query
    # next to the outlier, k=3 outvotes it
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, -0.1], [0.99, 0.01], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 0, 1, 1, 1])
    val_x, val_y = torch.tensor([[0.99, 0.012], [0.05, 1.0]]), torch.tensor([0, 1])
    classifier = NeighborClassifier("knn", temperature=0.07, k_grid=[1, 3, 1000])
    k, record = choose_k(classifier, train_x, train_y, val_x, val_y, num_classes=2)
    assert record["k_grid"] == [1, 3, 6]  # 1000 capped at the 6 training images
    assert record["val_acc"][0] == 0.5 and record["val_acc"][1] == 1.0
    assert k == 3  # 3 and (maybe) 6 both reach 1.0: the smaller


def test_knn_training_accuracy_leaves_each_image_out_of_its_own_vote():
    head = KnnHead(2, 2, memory_size=3, k=1, temperature=0.07)
    # the lone class-1 image's nearest other image is class 0: wrong when left out, right if not
    features, labels = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), torch.tensor([0, 0, 1])
    head.store(features, labels)
    loss, accuracy = training_metrics(head, features, labels)
    assert accuracy == pytest.approx(2 / 3) and math.isfinite(loss)
    assert (head(features).argmax(1) == labels).all()  # with itself in the vote every image is right


BAD = [
    (["mode=knn", "mode.k_grid=[]"], "mode.k_grid=[] must be a non-empty list of integers >= 1"),
    (["mode=knn", "mode.k_grid=[0,10]"], "mode.k_grid=[0, 10] must be a non-empty list"),
    (["mode=knn", "mode.k_grid=[2.5]"], "mode.k_grid=[2.5] must be"),
    (["mode=knn", "mode.k_grid=10"], "mode.k_grid=10 must be a non-empty list"),
    (["mode=knn", "mode.temperature=0"], "mode.temperature=0 must be a positive finite number"),
    (["mode=ncm", "mode.temperature=-1"], "mode.temperature=-1 must be a positive finite number"),
    (["mode=knn", "mode.temperature=inf"], "mode.temperature=inf must be a positive finite number"),
    (["mode=ncm", "mode.temperature=true"], "mode.temperature=True must be a positive finite number"),
    (["mode=knn", "head=mlp"], "mode=knn solves for a linear head"),
    (["mode=ncm", "data.augment=true"], "mode=ncm fits on the backbone's features computed once"),
    (["mode=knn", "ckpt_path=last"], "mode=knn solves in one go"),
    (["mode=ncm", "trainer.limit_val_batches=1"], "mode=ncm solves and chooses on the whole splits"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_settings_are_refused_before_anything_is_built(overrides, message, tmp_path):
    from transferlab.build import check_config

    with pytest.raises(UserError, match=re.escape(message)):
        check_config(compose_config(["backbone=cnn_small", *overrides], tmp_path), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["knn", "ncm"])
def test_a_run_writes_the_usual_results_and_a_checkpoint_predict_and_export_read(
    mode, cifar10_root, torch_home, tmp_path
):
    run_dir = tmp_path / mode
    data = [f"data.root={cifar10_root}", "data.download=false"]
    metrics = run_training([*tiny_run(), *data, f"mode={mode}"], run_dir)
    for key in ("train/acc", "train/loss", "val/acc", "val/acc_best", "test/acc", "test/nll", "test/images"):
        assert key in metrics, key
    assert metrics["epochs"] == 0 and metrics["params_trainable"] == 0
    assert metrics["best_checkpoint"] == f"checkpoints/best-{mode}.ckpt"
    record = json.loads((run_dir / "run_info.json").read_text())[mode]
    assert record["solver"] == mode
    if mode == "knn":
        assert metrics["k"] == record["k"] and record["k"] in record["k_grid"]
    assert (run_dir / "confusion_matrix.csv").is_file()

    # load_from_checkpoint rebuilds the stored head without the config, and tests the same
    from transferlab.models import TransferModule

    model = TransferModule.load_from_checkpoint(run_dir).eval()
    assert type(model.head).__name__ == ("KnnHead" if mode == "knn" else "NcmHead")
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        probabilities = model(images).softmax(1)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(5))

    # predict and export read it as any run
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(photos / f"{i}.png")
    out = tmp_path / "preds.csv"
    predicted = cli(
        [str(run_dir), str(photos), "--out", str(out)], tmp_path, torch_home, module="transferlab.predict"
    )
    assert predicted.returncode == 0, predicted.stderr
    assert len(list(csv.DictReader(out.open()))) == 3
    for fmt, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        exported = cli(
            [str(run_dir), "--format", fmt, "--out", str(tmp_path / name)],
            tmp_path,
            torch_home,
            module="transferlab.export",
        )
        assert exported.returncode == 0, exported.stderr
        assert "checked: max |probability difference| vs PyTorch" in exported.stdout  # the parity check ran
        assert (tmp_path / name).is_file()
