"""What each mode is (`mode=`, conf/mode/*.yaml): the facts its YAML states (`pretrained`,
`backbone_fixed`, `head_solve`), read here only (`mode_facts`): the rest of the package asks the
facts, never the mode's name. How each mode trains (its Lightning callback) is `methods.modes`.

Light on purpose (no torch, no Lightning): `transferlab.cli` checks a mode's facts against the
rest of the command line before those are imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transferlab.models.weights import wants_weights
from transferlab.utils.errors import UserError

log = logging.getLogger("transferlab.methods.modes")  # the name the mode's warnings always had

#: where the callbacks that a mode names (mode.callback._target_) live
CALLBACKS = "transferlab.methods.modes"


# ---- what a mode is: the facts of conf/mode/*.yaml, read here and nowhere else ---------------------
#: how a mode sets its head besides (or instead of) training: `before_fit` (LP-FT's probe, then a fit),
#: `instead_of_fit` (the linear probe: one solve, no epochs)
HEAD_SOLVES = ("none", "before_fit", "instead_of_fit")


@dataclass(frozen=True)
class Mode:
    """What a `mode=` option means, from the facts its YAML states."""

    name: str  # the option's label (shown, never compared: the facts decide)
    pretrained: bool  # starts from backbone.weights; false: random init (scratch)
    backbone_fixed: bool  # no backbone parameter ever trains: its features can be computed once
    head_solve: str  # one of HEAD_SOLVES
    train_bn: bool = False

    @property
    def fits(self) -> bool:
        """Whether the run trains epochs (`trainer.fit`)."""
        return self.head_solve != "instead_of_fit"

    @property
    def solves_head(self) -> bool:
        return self.head_solve != "none"

    def starting_weights(self, weights: Any) -> Any:
        """What the backbone starts from: `backbone.weights`, or random init (`none`) for a mode that is
        not pretrained (scratch), whatever `backbone.weights` says. The one home of that rule: building,
        the checks and the HParams the run reports ask it."""
        return weights if self.pretrained else "none"

    def caches_features(self, setting: Any, augment: bool) -> bool:
        """Whether the backbone's features are computed once and the head trains on them.

        `auto`: exactly when cached and uncached training are the same computation (a backbone
        that never trains, BatchNorm included, and no augmentation); `true` refuses otherwise.
        """
        exact = self.backbone_fixed and not augment and not self.train_bn
        if str(setting).lower() == "auto":
            return exact
        if setting in (True, "true"):
            if not self.backbone_fixed or self.train_bn:
                raise UserError(
                    f"data.cache_features=true needs mode=frozen with train_bn=false (got mode={self.name}): "
                    f"a backbone that trains changes its features every step"
                )
            if augment:
                raise UserError(
                    "data.cache_features=true needs data.augment=false: augmented images differ every epoch, "
                    "so their features cannot be computed once; use data.cache_features=auto or false"
                )
            return True
        return False


def facts_before_they_were_stated(name: Any) -> dict[str, Any]:
    """The facts of a built-in mode, for configs recorded before conf/mode/*.yaml stated them
    (run.resume compares an older run's config with them)."""
    fixed, solve = {
        "frozen": (True, "none"),
        "linear_probe": (True, "instead_of_fit"),
        "lp_ft": (False, "before_fit"),
    }.get(str(name), (False, "none"))
    return {"backbone_fixed": fixed, "head_solve": solve}


def mode_facts(mode: Any) -> Mode:
    """The facts a `mode` config node states, refused in one line where they contradict each other."""
    name = str(mode.get("name", "?"))
    facts = {key: mode.get(key) for key in ("pretrained", "backbone_fixed", "train_bn")}
    for key, value in facts.items():
        if not isinstance(value, bool):
            raise UserError(f"mode.{key}={value!r} must be true or false (conf/mode/{name}.yaml states it)")
    head_solve = mode.get("head_solve")
    if head_solve not in HEAD_SOLVES:
        raise UserError(
            f"mode.head_solve={head_solve!r} must be one of {', '.join(HEAD_SOLVES)} (conf/mode/{name}.yaml)"
        )
    facts = Mode(name=name, head_solve=head_solve, **facts)
    if facts.head_solve == "instead_of_fit" and not facts.backbone_fixed:
        raise UserError(
            f"mode={name}: head_solve=instead_of_fit trains no epoch, so its backbone is fixed; set mode.backbone_fixed=true"
        )
    callback_train_bn = (mode.get("callback") or {}).get("train_bn", False)
    if not isinstance(callback_train_bn, bool):
        raise UserError(
            f"mode.callback.train_bn={callback_train_bn!r} must be true or false (conf/mode/{name}.yaml sets it "
            f"from mode.train_bn)"
        )
    if facts.fits and not mode.get("callback"):
        raise UserError(
            f"mode={name} trains epochs but names no mode.callback (what trains in each epoch); add one, e.g. {CALLBACKS}.TrainAll"
        )
    if (
        facts.backbone_fixed
        and facts.fits
        and str((mode.get("callback") or {}).get("_target_", "")).rsplit(".", 1)[-1] != "FreezeBackbone"
    ):
        raise UserError(
            f"mode={name}: backbone_fixed=true needs the callback that keeps it fixed ({CALLBACKS}.FreezeBackbone)"
        )
    return facts


def check_mode(mode: Any, max_epochs: int | None, weights: Any) -> Mode:
    """The mode's facts and settings against the budget and the weights, before anything is built.

    A gradual unfreeze that never happens is a frozen run under another name; a fixed random
    backbone (mode=frozen or a probe with random weights) is a legitimate baseline, but easy to
    run by accident.
    """
    facts = mode_facts(mode)
    unfreeze_at = mode.get("unfreeze_at_epoch")
    if unfreeze_at is not None and max_epochs is not None and max_epochs > 0 and unfreeze_at >= max_epochs:
        raise UserError(
            f"mode.unfreeze_at_epoch={unfreeze_at} with trainer.max_epochs={max_epochs}: the backbone never unfreezes "
            f"(epochs count from 0); set mode.unfreeze_at_epoch<{max_epochs} or trainer.max_epochs>{unfreeze_at}"
        )
    weights = facts.starting_weights(weights)
    if not wants_weights(weights) and (facts.backbone_fixed or facts.solves_head):
        what = "the probe fits" if facts.solves_head else "the backbone is"
        log.warning(
            "mode=%s with random weights: %s a fixed random feature extractor (backbone.weights=%s)",
            facts.name,
            what,
            weights,
        )
    if not wants_weights(weights) and _holds_batchnorm_statistics(mode):
        log.warning(
            "mode=%s with random weights holds the backbone's BatchNorm in eval mode, with its initial statistics "
            "(mean 0, variance 1): there are no pretrained ones to keep; mode.train_bn=true lets them adapt",
            facts.name,
        )
    return facts


def _holds_batchnorm_statistics(mode: Any) -> bool:
    """The mode trains everything with the backbone's BatchNorm in eval mode (TrainAll, train_bn=false)."""
    callback = mode.get("callback") or {}
    target = str(callback.get("_target_", "")).rsplit(".", 1)[-1]
    return target == "TrainAll" and callback.get("train_bn", True) is False
