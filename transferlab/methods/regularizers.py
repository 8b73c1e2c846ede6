"""Fine-tuning regularizers: the `regularizer=` group (`conf/regularizer/`).

Each is a small class called as `regularizer(model, features) -> scalar tensor` at every
training step; `TransferModule.training_step` adds it to the cross-entropy and logs it as
`train/penalty` (`train/loss` stays the cross-entropy alone, comparable across methods).

- `L2SP` (Li et al. 2018, "Explicit inductive bias for transfer learning with convolutional
  networks"): alpha * ||w - w0||^2 over the backbone, w0 the weights it was loaded with
  (snapshotted when the model is built, `bind`), plus beta * ||w||^2 over the new head.
- `BSS` (Chen et al. 2019, "Catastrophic forgetting meets negative transfer: batch spectral
  shrinkage"): eta * the sum of the k smallest squared singular values of the batch's
  feature matrix (the backbone's output, before the head).

`check_regularizer` refuses combinations where the penalty would mean nothing; it runs in
`transferlab.build.check_config` before any weights or data are read.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn

from transferlab.methods.mode_facts import Mode
from transferlab.models.weights import wants_weights
from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)


class Regularizer:
    """A penalty on the model (and the batch's backbone features) added to the training loss."""

    def bind(self, model: nn.Module) -> None:
        """Called once by `TransferModule.__init__` with the freshly built (pretrained) model."""

    def __call__(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class L2SP(Regularizer):
    """alpha * sum ||w - w0||^2 over the backbone's parameters + beta * sum ||w||^2 over the head's.

    w0 is a copy of the backbone as `bind` sees it: `TransferModule` is built right after the
    backbone is loaded with `backbone.weights`, so w0 are the pretrained weights. A resumed run
    builds the model the same way before the checkpoint is loaded, so w0 stays the pretrained
    weights (it is not in the checkpoint: it is the weights file itself).
    """

    def __init__(self, alpha: float = 0.01, beta: float = 0.01):
        for name, value in (("alpha", alpha), ("beta", beta)):
            check_strength(name, value)
        self.alpha, self.beta = float(alpha), float(beta)
        self.reference: dict[str, torch.Tensor] = {}

    def bind(self, model: nn.Module) -> None:
        self.reference = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}

    def __call__(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        if not self.reference:
            raise RuntimeError("L2SP was not bound to a model (TransferModule binds it when it is built)")
        penalty = features.new_zeros(())
        # Parameters that do not train (a frozen backbone or stage) have never left w0: their term is
        # exactly 0, and skipping them keeps a frozen backbone's step cheap.
        distance = [
            (p - self._reference(name, p)).pow(2).sum()
            for name, p in model.backbone.named_parameters()
            if p.requires_grad
        ]
        if distance and self.alpha:
            penalty = penalty + self.alpha * torch.stack(distance).sum()
        size = [p.pow(2).sum() for p in model.head.parameters() if p.requires_grad]
        if size and self.beta:
            penalty = penalty + self.beta * torch.stack(size).sum()
        return penalty

    def _reference(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """w0 of `name` on the parameter's device and dtype (moved once, on first use)."""
        w0 = self.reference[name]
        if w0.device != param.device or w0.dtype != param.dtype:
            w0 = self.reference[name] = w0.to(device=param.device, dtype=param.dtype)
        return w0


class BSS(Regularizer):
    """eta * sum of the k smallest squared singular values of the batch's features (B x D).

    Shrinking the weakest spectral components of the features suppresses the directions
    that carry untransferable source knowledge (Chen et al. 2019); its gradient reaches the
    backbone only, through the features.
    """

    def __init__(self, eta: float = 0.001, k: int = 1):
        check_strength("eta", eta)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(
                f"regularizer.k={k!r} must be an integer >= 1 (the number of smallest singular values)"
            )
        self.eta, self.k = float(eta), k

        self._warned = False

    def __call__(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(1).float()
        singular = torch.linalg.svdvals(flat)  # descending; min(B, D) of them
        if self.k >= singular.numel() and not self._warned:
            # check_regularizer refuses k >= data.batch_size; a smaller last batch still gets here
            log.warning(
                "regularizer=bss: a batch of %d images has %d singular values, so k=%d penalizes all of them "
                "(plain feature-norm decay, not BSS); said once",
                flat.shape[0],
                singular.numel(),
                self.k,
            )
            self._warned = True
        return self.eta * singular[-min(self.k, singular.numel()) :].pow(2).sum()


#: the largest penalty strength accepted: far beyond the papers' values (1e-4 to 1e-1), a strength
#: this large makes the penalty the whole loss, and beyond about 1e30 it overflows in float32
MAX_STRENGTH = 1e4


def check_strength(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_STRENGTH:
        raise UserError(
            f"regularizer.{name}={value!r} must be a number in [0, {MAX_STRENGTH:g}] (the papers use 1e-4 to 1e-1; "
            "larger makes the penalty the whole loss)"
        )


def build_regularizer(settings: Any) -> Regularizer | None:
    """The configured regularizer (the `regularizer` node), or None for `regularizer=none` (and
    configs from before the group)."""
    if not settings or settings.get("name", "none") == "none":
        return None
    arguments = OmegaConf.masked_copy(
        settings, [key for key in settings if key != "name"]
    )  # name: the option's label
    try:
        return hydra.utils.instantiate(arguments)
    except Exception as error:  # Hydra wraps the constructor's own refusal: pass that on as is
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise


def check_regularizer(settings: Any, mode: Mode, weights: Any, batch_size: int | None = None) -> None:
    """Refuse the combinations where a penalty would be meaningless (before anything is built).

    `mode`: the mode's facts; `weights`: what the backbone starts from (random init for scratch);
    `batch_size`: data.batch_size (BSS penalizes the k smallest of a batch's min(B, D) singular values).
    """
    name = (settings or {}).get("name", "none")
    if name == "none":
        return
    build_regularizer(settings)  # its own argument checks (alpha >= 0, ...), before anything is built
    if not mode.fits:
        raise UserError(
            f"regularizer={name} with mode={mode.name}: the probe chooses its own L2 strength on validation "
            f"(mode.l2_grid); use regularizer=none"
        )
    if name == "l2sp":
        if not mode.pretrained:
            raise UserError(
                f"regularizer=l2sp pulls the backbone towards its pretrained weights, but mode={mode.name} starts from "
                f"random init (w0 would be random); use a mode that starts from backbone.weights (finetune, lp_ft, ...) "
                f"or regularizer=none"
            )
        if not wants_weights(weights):
            raise UserError(
                f"regularizer=l2sp pulls the backbone towards its pretrained weights, but backbone.weights="
                f"{weights} is random init (w0 would be random); give pretrained weights "
                f"(imagenet, a file or a run dir) or use regularizer=none"
            )
        if mode.backbone_fixed:
            # Allowed: the backbone never moves, so alpha's term is exactly 0 and what remains is the
            # paper's beta * ||w||^2 on the new head (an L2 penalty on it), still a well-defined method.
            log.info(
                "regularizer=l2sp with mode=%s: the backbone does not train, only the head's beta term applies",
                mode.name,
            )
    if name == "bss" and isinstance(batch_size, int) and settings.get("k", 1) >= batch_size:
        raise UserError(
            f"regularizer.k={settings.get('k')} with data.batch_size={batch_size}: a batch has at most {batch_size} "
            f"singular values, so every one would be penalized (plain feature-norm decay, not BSS); set regularizer.k<"
            f"{batch_size} (the paper: 1) or raise data.batch_size"
        )
    if name == "bss" and mode.backbone_fixed:
        raise UserError(
            f"regularizer=bss with mode={mode.name}: the backbone does not train, so a penalty on its features changes "
            "no gradient; use it with a mode that trains the backbone (finetune, lp_ft, ...) or regularizer=none"
        )
