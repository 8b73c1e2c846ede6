"""What a report writes, and where: report.csv, paired.csv and crossover.csv (when there are
pairs and crossings to report), the figures, then report.md linking them; selected.csv and
selected.md beside them with `--select-by`."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

from transferlab.report.analysis import Analysis, analyse
from transferlab.report.compare import fewshot_keys
from transferlab.report.crossover import crossover_csv_rows
from transferlab.report.figures import plot_curves, plot_sample_efficiency
from transferlab.report.pairing import paired_csv_rows
from transferlab.report.runs import Run, UnfinishedJob
from transferlab.report.selection import (
    SELECTED_CSV,
    SELECTED_MD,
    Selection,
    selected_markdown,
    selected_rows,
)
from transferlab.report.stats import Options
from transferlab.report.tables import report_markdown, summary_table, write_csv
from transferlab.utils.errors import UserError

FIGURES = ("curves", "sample_efficiency")
#: tables written only when there is something in them: an earlier report's copy is removed
OPTIONAL_TABLES = ("paired", "crossover")
#: errors that mean "this folder cannot take the report", which --out fixes
UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def write_report(
    runs: list[Run],
    out_dir: Path,
    sources: list[Path] | None = None,
    unfinished: list[UnfinishedJob] | None = None,
    options: Options | None = None,
) -> dict[str, Path]:
    """Write report.md, report.csv, paired.csv and crossover.csv (when there are any) and the
    figures into `out_dir`; returns what was written."""
    out_dir = Path(out_dir)
    check_writable(out_dir)  # before any figure is drawn
    try:
        return _write_all(analyse(runs, options), out_dir, sources, unfinished)
    except OSError as e:  # the folder filled up or became read-only while writing
        if e.errno not in UNWRITABLE:
            raise
        raise UserError(_cannot_write(out_dir, e)) from None


def write_selection(selection: Selection, out_dir: Path) -> dict[str, Path]:
    """Write selected.csv and selected.md (`--select-by`) into `out_dir`; returns what was written."""
    out_dir = Path(out_dir)
    written = {"selected_csv": out_dir / SELECTED_CSV, "selected_md": out_dir / SELECTED_MD}
    try:
        check_writable(out_dir)
        write_csv(selected_rows(selection), written["selected_csv"])
        written["selected_md"].write_text(selected_markdown(selection))
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        raise UserError(_cannot_write(out_dir, e)) from None
    return written


def remove_stale_selection(out_dir: Path) -> None:
    """A report without --select-by: selected.csv/.md of an earlier report, which chose among other
    runs (or other numbers), must not linger beside this one."""
    for name in (SELECTED_CSV, SELECTED_MD):
        (Path(out_dir) / name).unlink(missing_ok=True)


def check_writable(out_dir: Path) -> None:
    """Create `out_dir` if needed and write (then remove) a probe file in it: a read-only mount,
    a folder without permission or a full disk is one line naming --out, not a traceback."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as e:
        raise UserError(_cannot_write(out_dir, e)) from None


def _cannot_write(out_dir: Path, error: OSError) -> str:
    reason = error.strerror or type(error).__name__
    return f"cannot write the report to {out_dir} ({reason}); pick another folder with --out"


def _write_all(analysis: Analysis, out_dir: Path, sources, unfinished) -> dict[str, Path]:
    written = {"csv": out_dir / "report.csv"}
    write_csv(summary_table(analysis), written["csv"])
    tables = {
        "paired": paired_csv_rows(analysis.paired),
        "crossover": crossover_csv_rows(analysis.crossovers),
    }
    for name in OPTIONAL_TABLES:
        path = out_dir / f"{name}.csv"
        path.unlink(missing_ok=True)  # a stale table from an earlier report must not linger
        if tables[name]:
            write_csv(tables[name], path)
            written[name] = path
    written.update(_write_figures(analysis, out_dir))
    written["md"] = out_dir / "report.md"
    written["md"].write_text(report_markdown(analysis, written, sources or [], unfinished or []))
    return written


def _write_figures(analysis: Analysis, out_dir: Path) -> dict[str, Path]:
    runs, settings = analysis.runs, analysis.settings
    plots = {"curves": lambda path: plot_curves(runs, settings, path)}
    if fewshot_keys(analysis.keys):  # one training set size has no sample-efficiency curve to draw
        plots["sample_efficiency"] = lambda path: plot_sample_efficiency(
            runs,
            settings,
            path,
            arm=analysis.options.arms,
            crossovers=analysis.crossovers,
            names=analysis.arm_names,
        )
    for name in FIGURES:
        (out_dir / f"{name}.png").unlink(
            missing_ok=True
        )  # a stale figure from an earlier report must not linger
    written = {}
    for name, plot in plots.items():
        if plot(out_dir / f"{name}.png"):
            written[name] = out_dir / f"{name}.png"
    return written
