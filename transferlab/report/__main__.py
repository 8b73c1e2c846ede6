"""The command line: `python -m transferlab.report` and `transferlab-report` (SWEEP_DIR [RUN_DIR ...])."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transferlab.utils.errors import UserError, exit_with
from transferlab.report.compare import set_apart
from transferlab.report.output import write_report
from transferlab.report.runs import UnfinishedJob, find_jobs, is_run, load_finished, load_unfinished, overrides_text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run_dirs, unfinished_dirs = find_jobs(args.paths)
        runs, broken = load_finished(run_dirs)
        unfinished = broken + [load_unfinished(d) for d in unfinished_dirs]
        if not runs:
            set_apart(unfinished, [])
            print("\n".join(unfinished_lines(unfinished)), flush=True)  # before the error line on stderr
            raise UserError(
                f"no finished runs to compare in {', '.join(map(str, args.paths))}: all {len(unfinished)} jobs "
                f"failed or did not finish (listed above)"
            )
        set_apart(unfinished, runs)
        out_dir = args.out or default_out_dir(args.paths)
        written = write_report(runs, out_dir, sources=args.paths, unfinished=unfinished)
        if args.rank:
            from transferlab.report.agreement import write_agreement

            written["rank_agreement"], agreement_text = write_agreement(args.rank, runs, out_dir)
            print(agreement_text, flush=True)
    except UserError as error:
        exit_with(error)
    for path in written.values():
        print(path)
    for line in unfinished_lines(unfinished):
        print(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="transferlab-report",
        description="Tables and plots comparing finished transferlab runs (a sweep dir, or run dirs).",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="SWEEP_DIR_OR_RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the sweep dir, else the current dir)")
    parser.add_argument(
        "--rank", type=Path, default=None, metavar="RANK_CSV",
        help="a rank.csv of python -m transferlab.rank: adds rank_agreement.md, each score against the runs' "
        "mean test accuracy per backbone, with Kendall's tau-b",
    )
    return parser.parse_args(argv)


def default_out_dir(paths: list[Path]) -> Path:
    """The sweep dir when the first argument is one (not itself a run), else the current dir."""
    first = Path(paths[0])
    return first if not is_run(first) else Path.cwd()


def unfinished_lines(jobs: list[UnfinishedJob]) -> list[str]:
    """What the command prints: one line per job that did not finish."""
    if not jobs:
        return []
    lines = [f"{len(jobs)} job{'s' if len(jobs) > 1 else ''} did not finish (not in the tables):"]
    lines += [f"  {job.status}: {job.path} [{overrides_text(job.overrides)}]: {job.explanation}" for job in jobs]
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
