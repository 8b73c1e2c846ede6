"""Models: backbones cut at their features, heads, and the LightningModule around them."""

from transferlab.models.backbones import Backbone, cnn_small, torchvision_backbone, truncated_resnet, vgg_blocks
from transferlab.models.heads import linear_head, mlp_head
from transferlab.models.module import TransferModule
from transferlab.models.timm_backbones import efficientnet_lite, timm_backbone

__all__ = [
    "Backbone",
    "TransferModule",
    "cnn_small",
    "efficientnet_lite",
    "linear_head",
    "mlp_head",
    "timm_backbone",
    "torchvision_backbone",
    "truncated_resnet",
    "vgg_blocks",
]
