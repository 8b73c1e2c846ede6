"""Models: backbones cut at their features (and the weights they start from), heads, the
LightningModule around them, the architecture record a checkpoint keeps, and a trained model
loaded back (`models.trained.load_trained`).
Imported by `methods`, `run`, `build` and the commands, and named by conf/backbone, conf/head and
conf/model (`transferlab.models.<builder>`): the names below are the public face.
"""

from transferlab.utils.lazy import lazy_names

#: each public name and the module that defines it, imported on first use: the light parts of this
#: package (models.weights, models.architecture) and the checks before a run (transferlab.cli) must
#: not pay for Lightning, which models.module imports
_HOMES = {
    "Backbone": "transferlab.models.backbones",
    "cnn_small": "transferlab.models.backbones",
    "torchvision_backbone": "transferlab.models.backbones",
    "truncated_resnet": "transferlab.models.backbones",
    "vgg_blocks": "transferlab.models.backbones",
    "knn_head": "transferlab.models.heads",
    "linear_head": "transferlab.models.heads",
    "mlp_head": "transferlab.models.heads",
    "ncm_head": "transferlab.models.heads",
    "TransferModule": "transferlab.models.module",
    "efficientnet_lite": "transferlab.models.timm_backbones",
    "timm_backbone": "transferlab.models.timm_backbones",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_names(__name__, _HOMES)
