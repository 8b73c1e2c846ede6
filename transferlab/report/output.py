"""What a report writes, and where: report.csv, the figures, then report.md linking them."""

from __future__ import annotations

from pathlib import Path

from transferlab.errors import UserError
from transferlab.report.compare import differing_overrides, fewshot_keys
from transferlab.report.figures import plot_curves, plot_sample_efficiency
from transferlab.report.runs import Run, UnfinishedJob
from transferlab.report.tables import report_markdown, summary_table, write_csv

FIGURES = ("curves", "sample_efficiency")


def write_report(
    runs: list[Run], out_dir: Path, sources: list[Path] | None = None, unfinished: list[UnfinishedJob] | None = None
) -> dict[str, Path]:
    """Write report.md, report.csv and the figures into `out_dir`; returns what was written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report to {out_dir} ({e.strerror}); pick another folder with --out") from None
    keys = differing_overrides(runs)
    written = {"csv": out_dir / "report.csv"}
    write_csv(summary_table(runs, keys), written["csv"])
    written.update(_write_figures(runs, keys, out_dir))
    written["md"] = out_dir / "report.md"
    written["md"].write_text(report_markdown(runs, keys, written, sources or [], unfinished or []))
    return written


def _write_figures(runs: list[Run], keys: list[str], out_dir: Path) -> dict[str, Path]:
    plots = {"curves": plot_curves}
    if fewshot_keys(keys):  # one training set size has no sample-efficiency curve to draw
        plots["sample_efficiency"] = plot_sample_efficiency
    for name in FIGURES:
        (out_dir / f"{name}.png").unlink(missing_ok=True)  # a stale figure from an earlier report must not linger
    written = {}
    for name, plot in plots.items():
        if plot(runs, keys, out_dir / f"{name}.png"):
            written[name] = out_dir / f"{name}.png"
    return written
