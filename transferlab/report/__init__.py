"""`transferlab-report SWEEP_DIR [RUN_DIR ...]`: compare finished runs without re-running any.

Everything comes from what a run already wrote: `.hydra/overrides.yaml` says how runs differ,
`metrics.json` gives the final numbers, the TensorBoard event files give the curves. Output
(into the sweep dir, or --out): report.md, report.csv, curves.png and, when the runs differ in
their few-shot training set size, sample_efficiency.png.

One module per step: `runs` finds and reads runs (and jobs that did not finish), `compare`
says how they differ and averages repeats, `tables` and `figures` draw that (`curves` reads
the event files), `selection` chooses a setting on validation (`--select-by`), `output`
writes the files, `__main__` is the command line.
"""

from __future__ import annotations

from transferlab.report.output import write_report
from transferlab.report.runs import load_runs
from transferlab.report.tables import summary_markdown

__all__ = ["load_runs", "main", "summary_markdown", "write_report"]


def __getattr__(name: str):
    # `main` lives in __main__.py and is loaded on first use: importing it here would make
    # `python -m transferlab.report` warn that its __main__ module was imported twice (runpy).
    if name == "main":
        from transferlab.report.__main__ import main

        return main
    raise AttributeError(f"module 'transferlab.report' has no attribute {name!r}")
