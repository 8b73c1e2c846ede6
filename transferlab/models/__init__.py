"""Models: backbones cut at their features (and the weights they start from), heads, the
LightningModule around them, the architecture record a checkpoint keeps, and a trained model
loaded back (`models.trained.load_trained`).

Imported by `methods`, `run`, `build` and the commands, and named by conf/backbone, conf/head and
conf/model (`transferlab.models.<builder>`): the names below are the public face.
"""

from transferlab.models.backbones import (
    Backbone,
    cnn_small,
    torchvision_backbone,
    truncated_resnet,
    vgg_blocks,
)
from transferlab.models.heads import knn_head, linear_head, mlp_head, ncm_head
from transferlab.models.module import TransferModule
from transferlab.models.timm_backbones import efficientnet_lite, timm_backbone

__all__ = [
    "Backbone",
    "TransferModule",
    "cnn_small",
    "efficientnet_lite",
    "knn_head",
    "linear_head",
    "mlp_head",
    "ncm_head",
    "timm_backbone",
    "torchvision_backbone",
    "truncated_resnet",
    "vgg_blocks",
]
