"""What a run leaves behind: its test metrics, `metrics.json` and `run_info.json`.

Also the two things a resumed run needs to report numbers of the whole run: the test of a
finished run's best checkpoint, and the training time its checkpoints recorded.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from transferlab.run.provenance import run_info
from transferlab.run.resume import ResumePlan
from transferlab.store.rundir import RunDir, read_checkpoint, recorded_best
from transferlab.utils.errors import UserError
from transferlab.utils.numbers import as_number

if TYPE_CHECKING:  # heavy: Lightning; this module stays light for check_optimized_metric (transferlab.cli)
    import lightning as L

    from transferlab.models import TransferModule

log = logging.getLogger("transferlab")


def test_best(trainer: L.Trainer, model: TransferModule, datamodule) -> dict[str, float]:
    """Test metrics from the best checkpoint by val/acc (the current weights if there is none)."""
    best = best_checkpoint_path(trainer)
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    return {k: as_number(v) for k, v in (results[0] if results else {}).items()}


def best_checkpoint_path(trainer: L.Trainer) -> str:
    """The best checkpoint of the fit ("" if none): the first checkpoint callback's (conf/callbacks:
    the best by val/acc; LP-FT's probe state while no epoch beat it)."""
    return trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""


def best_checkpoint_entry(best: str | Path | None, output_dir: Path) -> dict[str, str]:
    """metrics.json's `best_checkpoint`: the checkpoint the run stands for, whose weights were tested
    (`checkpoints/best-epoch003.ckpt`, LP-FT's `checkpoints/probe-lbfgs.ckpt`), relative to the run dir
    (absolute when it lies elsewhere: another run's checkpoint resumed here); none without one."""
    if not best:
        return {}
    path = Path(best)
    try:
        return {"best_checkpoint": path.resolve().relative_to(Path(output_dir).resolve()).as_posix()}
    except ValueError:
        return {"best_checkpoint": str(path)}


def write_results(
    cfg: DictConfig,
    output_dir: Path,
    metrics: dict,
    plan: ResumePlan | None,
    probe: dict | None = None,
    calibration: dict | None = None,
    backbone_weights: str | None = None,
    evaluation: dict | None = None,
    precision: str | None = None,
) -> None:
    """`probe`: what a linear probe (mode=linear_probe, lp_ft) chose; `calibration`: the temperature
    fitted after the test and how (`run.calibration`); `backbone_weights`: what the backbone started
    from, as loaded; `evaluation`: the corruption evaluation's settings (`run.robustness`); all
    recorded in run_info.json; `precision`: the precision it trained in, as resolved (trainer.precision=auto)."""
    run_dir = RunDir(output_dir)
    run_dir.metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    record = run_record(cfg, output_dir, plan, probe, calibration)
    if evaluation is not None:  # the corruption evaluation's settings (run.robustness); the latest stands
        record["eval"] = evaluation
    if precision is not None:
        record.setdefault("precision", precision)  # a resume trains in the same (run.precision)
    if backbone_weights is not None:
        # The first process's record stands: a resume builds from the same starting weights.
        record.setdefault("backbone_weights", recorded_weights(backbone_weights))
    run_dir.run_info.write_text(json.dumps(record, indent=2) + "\n")
    log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    log.info("outputs in %s", output_dir)


def recorded_weights(source: str) -> str:
    """A weights source as run_info.json records it: a file by its absolute path (analyses compare
    it with the path a ranking read), anything else (`torchvision:...`, `random init`) as it is."""
    path = Path(source)
    return str(path.resolve()) if path.is_file() else source


def run_record(
    cfg: DictConfig,
    output_dir: Path,
    plan: ResumePlan | None,
    probe: dict | None = None,
    calibration: dict | None = None,
) -> dict:
    """run_info.json: how the run began, and one entry per resume (a longer budget is recorded there);
    `linear_probe`: the probe's grid and choice (an LP-FT resume restores it from its checkpoint);
    `temperature` and `calibration`: the temperature fitted after the test, and on what."""
    info = run_info(cfg)
    record = info if plan is None else (RunDir(output_dir).read_run_info() or info)
    if probe is not None:
        # the L-BFGS probe's under `linear_probe`; a kNN / NCM solve's under its solver's name
        record[probe.get("solver", "linear_probe")] = probe
    if calibration is not None:
        record["temperature"] = calibration["temperature"]
        record["calibration"] = calibration
    if plan is None:
        return record
    record.setdefault("resumes", []).append(
        {
            "ckpt_path": str(plan.checkpoint),
            "from_epoch": plan.epochs_done,
            "max_epochs": plan.max_epochs,
            # the run now trains longer than it was started with: its numbers are the longer run's
            "longer_budget": plan.budget_raised,
            "tested_only": not plan.trains,
            "git_commit": info["git_commit"],
            "git_dirty": info["git_dirty"],
            "versions": info["versions"],
        }
    )
    return record


def test_without_training(trainer: L.Trainer, model: TransferModule, datamodule, plan: ResumePlan) -> dict:
    """Test the best checkpoint of a run with no epoch left to train; its training metrics stay."""
    previous = plan.previous_metrics()
    if not previous and plan.epochs_done:  # killed after its last epoch, or metrics.json deleted
        log.warning(
            "%s is missing: the new one has this test, val/acc_best, epochs and train_time_s, not the last "
            "epoch's train/* and val/* (checkpoints do not keep them; the run's TensorBoard curves do)",
            RunDir(plan.run_dir).metrics,
        )
    metrics = {k: v for k, v in previous.items() if not k.startswith("test/")}
    best = recorded_best(plan.checkpoint) or plan.checkpoint
    metrics.update(best_checkpoint_entry(best, plan.run_dir))
    if plan.test:
        results = trainer.test(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)
        metrics.update({k: as_number(v) for k, v in (results[0] if results else {}).items()})
        # the best checkpoint holds the best validation accuracy (a killed run has no metrics.json);
        # read only when missing: computing it warns on stderr (its state was restored, not updated)
        if "val/acc_best" not in metrics:
            metrics["val/acc_best"] = as_number(model.val_acc_best.compute())
    metrics.setdefault("epochs", plan.epochs_done)
    metrics.setdefault("train_time_s", round(_checkpoint_train_time(plan.checkpoint), 3))
    return metrics


def _checkpoint_train_time(path: Path) -> float:
    checkpoint = read_checkpoint(path, "ckpt_path")
    return float(((checkpoint.get("callbacks") or {}).get("TrainingClock") or {}).get("train_time_s", 0.0))


def whole_train_time(trainer: L.Trainer, plan: ResumePlan | None) -> float:
    """Training time of the whole run: a finished run resumed for a longer budget adds this part to
    its metrics.json time (its checkpoint's clock stopped at the last save, before the run ended)."""
    from transferlab.callbacks.guards import TrainingClock  # heavy: Lightning

    clock = next(c for c in trainer.callbacks if isinstance(c, TrainingClock))
    previous = plan.previous_metrics().get("train_time_s") if plan is not None else None
    return clock.elapsed() + previous if previous is not None else clock.total()


def whole_features_time(trainer: L.Trainer, plan: ResumePlan | None, this_process: float) -> float:
    """The cached features' time of the whole run: this process's plus the earlier ones' (a finished
    run's metrics.json, else the checkpoint's clock), as train_time_s counts training."""
    previous = plan.previous_metrics().get("features_time_s") if plan is not None else None
    if previous is None:
        from transferlab.callbacks.guards import TrainingClock  # heavy: Lightning

        clock = next((c for c in trainer.callbacks if isinstance(c, TrainingClock)), None)
        previous = clock.features_before if clock is not None else 0.0
    return float(previous) + this_process


def optimized_metric(cfg: DictConfig) -> str:
    """The metric a run returns to a sweeper (`optimized_metric`)."""
    return cfg.get("optimized_metric") or "val/acc_best"


def check_optimized_metric(metric: str | None, test: bool) -> None:
    """The value a sweeper optimizes must be one the run measures."""
    if metric and str(metric).startswith("test/") and not test:
        raise UserError(
            f"optimized_metric={metric} is only measured with test=true; optimize a val/ metric (val/acc_best)"
        )
    logged = logged_metrics()
    if metric and str(metric) not in logged:
        close = difflib.get_close_matches(str(metric), logged, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(
            f"optimized_metric={metric} is not a metric of the run; {hint}the run logs {', '.join(logged)}"
        )


def logged_metrics() -> list[str]:
    """The names TransferModule logs (its `self.log("...")` and `self._log_epoch_metric("...")` calls),
    read from its source so the list cannot drift from the model."""
    source = Path(
        importlib.util.find_spec("transferlab.models.module").origin
    ).read_text()  # not imported: Lightning
    return sorted(set(re.findall(r"""self\.(?:log|_log_epoch_metric)\(\s*["']([^"']+)["']""", source)))
