"""An exported ONNX model vs. PyTorch on the real CIFAR-10 test images.

    python benchmarks/export_parity.py RUN_DIR MODEL.onnx CIFAR_ROOT/cifar-10-batches-py

Prints the largest probability difference, the share of images where both pick the same
class, and the ONNX model's accuracy (compare with the run's test/acc: the exported model
takes uint8 images at the run's size, so 32 px images are upsampled as uint8 here, where
training upsampled them after normalization).
"""

import pickle
import sys

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from transferlab.models.trained import load_trained

run, onnx_file, batches = sys.argv[1:4]
d = pickle.load(open(f"{batches}/test_batch", "rb"), encoding="bytes")
x = torch.from_numpy(np.asarray(d[b"data"]).reshape(-1, 3, 32, 32))
y = np.asarray(d[b"labels"])
trained = load_trained(run)
size = trained.image_size
# the exported model takes uint8 images at the run's size: upsample the 32 px images as uint8
x = (
    F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    .round()
    .clamp(0, 255)
    .to(torch.uint8)
)
session = ort.InferenceSession(onnx_file)
classifier = trained.classifier()
onnx_p, torch_p = [], []
with torch.inference_mode():
    for i in range(0, len(x), 500):
        onnx_p.append(session.run(None, {session.get_inputs()[0].name: x[i : i + 500].numpy()})[0])
        torch_p.append(classifier(x[i : i + 500]).numpy())
onnx_p, torch_p = np.concatenate(onnx_p), np.concatenate(torch_p)
print(
    f"{len(x)} test images: max |onnx - pytorch| probability {np.abs(onnx_p - torch_p).max():.1e}; "
    f"same class for {np.mean(onnx_p.argmax(1) == torch_p.argmax(1)):.2%}; onnx accuracy {np.mean(onnx_p.argmax(1) == y):.2%}"
)
