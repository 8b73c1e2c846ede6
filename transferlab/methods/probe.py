"""The standard linear probe, and the probe stage of LP-FT.

`head_solve: instead_of_fit`, `mode=linear_probe` (Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?"):
multinomial logistic regression on the frozen backbone's cached features, solved full-batch
with L-BFGS (strong-Wolfe line search), its L2 strength chosen on the validation split from a
log grid, refit on the training split with the chosen strength, tested once at the end.

Why not a Lightning fit: L-BFGS on the whole training set is one deterministic solve, not
epochs of minibatches; wrapping it in `trainer.fit` would add a fake epoch, an optimizer
state nobody resumes and checkpoints of a half-solved problem. So the solve runs here on
the feature tensors, the solution is copied into the model's linear head, and Lightning does
what it does for every run: `trainer.validate` / `trainer.test` run the model's own
val/test steps (same metric names, same TensorBoard tags) and `trainer.save_checkpoint`
writes a checkpoint like any run's (a `TransferModule` state dict, backbone + head, with its
`transferlab` record), which `backbone.weights=RUN_DIR` and the other tools read.

`head_solve: before_fit`, `mode=lp_ft` (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): the same
solver sets the head (`probe_head_before_fit`) before an ordinary fine-tuning fit. That probe
state is validated like an epoch and saved as `checkpoints/probe-lbfgs.ckpt`
(`validate_probe_state`), and it is the run's best checkpoint until a fine-tuning epoch reaches a
strictly higher val/acc: fine-tuning on a few images can end below the probe it started from,
and the run then keeps (and tests) the probe. A resumed run takes its head from the checkpoint
(the probe state itself for a run stopped before its first epoch's save) and does not solve
again; the probe's record travels in the checkpoint (`ProbeRecord`) and ends in `run_info.json`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn

from transferlab.methods.mode_facts import Mode
from transferlab.store.rundir import resumes
from transferlab.utils.errors import UserError
from transferlab.utils.numbers import as_number

log = logging.getLogger("transferlab")


@dataclass
class ProbeResult:
    """The chosen head and how it was chosen (what run_info.json records)."""

    l2: float  # the chosen strength
    l2_grid: list[float]
    val_acc: list[float]  # per grid value
    val_loss: list[float]
    iterations: int  # L-BFGS iterations of the final fit
    solve_time_s: float = 0.0
    weight: torch.Tensor = field(default=None, repr=False)  # (classes, features), in the raw feature space
    bias: torch.Tensor = field(default=None, repr=False)

    def record(self) -> dict:
        # not asdict: it would deep-copy the weight and bias only to drop them
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("weight", "bias")}


#: the L2 strengths where the probe's objective is finite and the penalty means something, on
#: features scaled to unit root mean square: above 1e4 the weights are ~0 (the bias alone), and
#: far above it the penalty's gradient overflows inside L-BFGS; below 1e-12 it is no penalty
L2_RANGE = (1e-12, 1e4)


class LinearProbe:
    """Multinomial logistic regression: mean cross-entropy + l2 * ||W||^2 (the bias is not penalized).

    Features are divided by one number while solving, their root mean square on the training
    split, so the grid means the same for any backbone's feature scale (and L-BFGS starts on a
    reasonably scaled problem); the head receives W / scale, a plain linear map of the raw
    features. One scale, not a per-feature standardization: dividing by a near-zero feature's
    std would give the head huge weights, which LP-FT's fine-tuning would then blow up.
    """

    def __init__(
        self,
        l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
        max_iter: int = 500,
    ):
        grid = list(l2_grid) if isinstance(l2_grid, Sequence) and not isinstance(l2_grid, str) else None
        if not grid or not all(_is_number(v) and v > 0 and math.isfinite(v) for v in grid):
            raise UserError(
                f"mode.l2_grid={l2_grid!r} must be a non-empty list of positive numbers (e.g. [1e-6,1e-4,1e-2,1])"
            )
        low, high = L2_RANGE
        outside = [v for v in grid if not low <= v <= high]
        if outside:
            raise UserError(
                f"mode.l2_grid has {outside[0]!r}, outside [{low:g}, {high:g}]: on the standardized features a "
                f"larger L2 leaves the bias alone and overflows L-BFGS, a smaller one is no penalty; keep the grid inside"
            )
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise UserError(f"mode.max_iter={max_iter!r} must be an integer >= 1 (L-BFGS iterations per fit)")
        self.l2_grid = sorted(float(v) for v in grid)
        self.max_iter = max_iter

    # ---- one fit --------------------------------------------------------------------------
    def fit(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, init=None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(weight, bias, iterations) minimizing mean CE(x @ W.T + b, y) + l2 * ||W||^2."""
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
        if init is not None:
            weight.copy_(init[0])
            bias.copy_(init[1])
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        solver = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=self.max_iter,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
        )

        def objective() -> torch.Tensor:
            solver.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        solver.step(objective)
        iterations = int(solver.state[weight].get("n_iter", 0))
        return weight.detach(), bias.detach(), iterations

    # ---- the protocol ---------------------------------------------------------------------
    def solve(self, train_x, train_y, val_x, val_y, num_classes: int) -> ProbeResult:
        """Fit every grid value on train, choose by val accuracy, refit on train with the choice.

        Ties in val accuracy go to the strongest regularization (the simplest model), as
        scikit-learn's LogisticRegressionCV does. The grid is walked from strong to weak, each
        fit warm-started from the previous one (the objective is strictly convex, so the start
        changes the speed, not the solution); the final fit starts from zero.
        """
        started = time.perf_counter()
        scale = train_x.pow(2).mean().sqrt().clamp_min(1e-12)
        tx, vx = train_x / scale, val_x / scale
        accs: dict[float, float] = {}
        losses: dict[float, float] = {}
        previous = None
        for l2 in reversed(self.l2_grid):  # sorted ascending in __init__
            previous = self.fit(tx, train_y, num_classes, l2, init=previous)
            with torch.no_grad():
                logits = vx @ previous[0].T + previous[1]
                accs[l2] = (logits.argmax(1) == val_y).float().mean().item()
                losses[l2] = F.cross_entropy(logits, val_y).item()
        best = max(self.l2_grid, key=lambda l2: (accs[l2], l2))
        weight, bias, iterations = self.fit(tx, train_y, num_classes, best)
        raw_weight, raw_bias = weight / scale, bias
        log.info(
            "linear probe: L2 %g chosen on validation (val acc %.4f; grid %s)",
            best,
            accs[best],
            ", ".join(f"{l2:g}: {accs[l2]:.4f}" for l2 in self.l2_grid),
        )
        return ProbeResult(
            l2=best,
            l2_grid=self.l2_grid,
            val_acc=[accs[l2] for l2 in self.l2_grid],
            val_loss=[losses[l2] for l2 in self.l2_grid],
            iterations=iterations,
            solve_time_s=time.perf_counter() - started,
            weight=raw_weight.cpu(),
            bias=raw_bias.cpu(),
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def probe_from_config(mode: Any) -> LinearProbe:
    """The probe the `mode` node describes (`mode.l2_grid`, `mode.max_iter`), its arguments checked."""
    grid = mode.get("l2_grid")
    # Anything but a list (mode.l2_grid=0.1) goes to LinearProbe as it is, to be refused there.
    return LinearProbe(list(grid) if isinstance(grid, ListConfig) else grid, mode.get("max_iter", 500))


# ---- checks before anything is built ------------------------------------------------------
def check_probe(
    facts: Mode, mode: Any, head_target: str, ckpt_path: Any, caches_features: bool, trainer: Any = None
) -> None:
    """A mode that solves for its head: a linear head, a valid grid; one that solves instead of a fit
    also needs features that can be computed once, has nothing to resume, and is measured on the
    splits it solved and chose on."""
    if not facts.solves_head:
        return
    if not str(head_target).endswith("linear_head"):
        name = str(head_target).rsplit(".", 1)[-1].removesuffix("_head")
        raise UserError(
            f"mode={facts.name} solves for a linear head (logistic regression), but head={name}; use head=linear"
        )
    from transferlab.methods.neighbors import (
        is_neighbor_mode,
        neighbors_from_config,
    )  # it imports this module

    # its own argument checks: the kNN / NCM settings, or the probe's grid
    neighbors_from_config(mode) if is_neighbor_mode(mode) else probe_from_config(mode)
    if facts.fits:
        return
    if resumes(ckpt_path):
        raise UserError(
            f"mode={facts.name} solves in one go (seconds) and has nothing to resume (ckpt_path={ckpt_path}); "
            f"drop ckpt_path and start a new run"
        )
    if not caches_features:
        raise UserError(
            f"mode={facts.name} fits on the backbone's features computed once, without augmentation; set "
            "data.augment=false, mode.train_bn=false and data.cache_features=auto (or true)"
        )
    _check_whole_splits(facts.name, trainer)


def validate_save_and_test(trainer, model, datamodule, checkpoint: Path, test: bool) -> dict:
    """After a solve: validation through the trainer (the metrics any run has), the checkpoint, then
    the test; their metrics as plain numbers. Shared by the probe and the neighbour classifiers."""
    metrics = {}
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics.update({k: as_number(v) for k, v in (validated[0] if validated else {}).items()})
    trainer.save_checkpoint(str(checkpoint))
    if test:
        tested = trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: as_number(v) for k, v in (tested[0] if tested else {}).items()})
    return metrics


def _check_whole_splits(name: str, trainer: Any) -> None:
    # The solve and the choice of its L2 strength read every training and validation feature; the
    # trainer's batch limits would cut only the reported val/acc and test/acc, which would then
    # describe other images than the grid record (run_info.json) does.
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = (trainer or {}).get(key)
        whole = value is None or (isinstance(value, float) and value == 1.0)  # an int counts batches
        if not whole:
            raise UserError(
                f"mode={name} solves and chooses on the whole splits, so trainer.{key}={value} would report "
                f"metrics of other images than it chose on; drop trainer.{key} (use data.fewshot.per_class for a smaller run)"
            )


# ---- mode=linear_probe: a solve instead of a fit ------------------------------------------------
def solve_instead_of_fit(
    trainer, model, datamodule, probe: LinearProbe, device: str, checkpoint: Path, test: bool
) -> dict:
    """Solve, validate, checkpoint, test; returns the metrics (written like any run's)."""
    from transferlab.callbacks.guards import (
        ProbeRecord,
    )  # heavy: Lightning (this module stays light for the checks)
    from transferlab.methods.modes import freeze

    freeze([model.backbone])  # the backbone never trains here; params_trainable counts the head
    result = solve_for_head(probe, datamodule.train, datamodule.val, datamodule.num_classes, device)
    set_linear_head(model.head, result.weight, result.bias)
    trainer.callbacks.append(ProbeRecord(result.record()))  # into the checkpoint and run_info.json
    train_loss, train_acc = _loss_and_accuracy(model.head, datamodule.train)
    metrics = {"train/loss": train_loss, "train/acc": train_acc}
    metrics.update(validate_save_and_test(trainer, model, datamodule, checkpoint, test))
    metrics.update(
        epochs=0,  # no epochs: one L-BFGS solve per grid value (run_info.json: linear_probe)
        train_time_s=round(result.solve_time_s, 3),
        lbfgs_iterations=result.iterations,
        l2=result.l2,
    )
    return metrics


def solve_for_head(probe: LinearProbe, train, val, num_classes: int, device: str) -> ProbeResult:
    def tensors(split):
        return split.images.float().to(device), split.labels.to(device)

    (tx, ty), (vx, vy) = tensors(train), tensors(val)
    return probe.solve(tx, ty, vx, vy, num_classes)


def set_linear_head(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy the solution into the head's (last) nn.Linear."""
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight))
        linear.bias.copy_(bias.to(linear.bias))


@torch.no_grad()
def _loss_and_accuracy(head: nn.Module, split) -> tuple[float, float]:
    was_training = head.training
    head.eval()
    logits = head(split.images.float())
    head.train(was_training)
    return F.cross_entropy(logits, split.labels).item(), (
        logits.argmax(1) == split.labels
    ).float().mean().item()


# ---- mode=lp_ft ---------------------------------------------------------------------------------
def probe_head_before_fit(
    trainer, model, datamodule, probe: LinearProbe, device: str, use_disk: bool, resuming: bool
) -> float:
    """LP-FT's first stage: the head solved on the pretrained backbone's features, before fit;
    returns the seconds the features took (`features_time_s`).

    On a resume the checkpoint restores the fine-tuned head (and the record), so nothing is
    solved again. The features come from the feature cache (shared with mode=frozen and
    linear_probe runs of the same data); their time counts in features_time_s, the solve in
    train_time_s (added to the training clock, which checkpoints carry across resumes).
    """
    from transferlab.callbacks.guards import ProbeRecord, TrainingClock  # heavy: Lightning
    from transferlab.data.features import feature_splits

    callback = ProbeRecord()
    trainer.callbacks.append(callback)
    if resuming:
        log.info("mode=lp_ft resumed: the head comes from the checkpoint, the probe stage is not repeated")
        return 0.0
    started = time.perf_counter()
    splits = feature_splits(
        model.backbone,
        datamodule,
        device=device,
        use_disk=use_disk,
        names=("train", "val"),
        precision=str(trainer.precision),  # the fit's: LP-FT's probe reads what its epochs would see
    )
    features_time = time.perf_counter() - started
    result = solve_for_head(probe, splits["train"], splits["val"], datamodule.num_classes, device)
    set_linear_head(model.head, result.weight, result.bias)
    callback.record = result.record()
    for clock in (c for c in trainer.callbacks if isinstance(c, TrainingClock)):
        clock.add(result.solve_time_s)
    return features_time


def validate_probe_state(trainer, model, datamodule, checkpoint: Path) -> dict[str, float]:
    """LP-FT's probe state, before any fine-tuning epoch: validated on the validation split like an
    epoch (val/acc, val/loss, and val/acc_best counts it), entered as a candidate for the best
    checkpoint and saved as `checkpoint`, a standalone checkpoint of 0 epochs (a run stopped before
    its first epoch's save resumes from it). Returns the validation metrics."""
    from transferlab.callbacks.guards import rank_checkpoint  # heavy: Lightning

    validated = trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {k: as_number(v) for k, v in (validated[0] if validated else {}).items()}
    ranked = rank_checkpoint(trainer, checkpoint, metrics)  # before the save: the file records itself as best
    trainer.save_checkpoint(str(checkpoint))
    shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("val/loss", "val/acc") if k in metrics)
    log.info(
        "probe state (before fine-tuning): %s, saved as %s; %s",
        shown,
        checkpoint,
        f"the best checkpoint until an epoch does strictly better on {', '.join(ranked)}"
        if ranked
        else "no checkpoint callback ranks it (none monitors a validation metric)",
    )
    return metrics


def probe_record(trainer) -> dict | None:
    """What the probe stage chose (the linear probe's, or LP-FT's, restored from its checkpoint on a resume)."""
    from transferlab.callbacks.guards import ProbeRecord  # heavy: Lightning

    callback = next((c for c in (trainer.callbacks if trainer else []) if isinstance(c, ProbeRecord)), None)
    return callback.record if callback and callback.record else None
