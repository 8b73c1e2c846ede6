"""The command line: `python -m transferlab.report` and `transferlab-report` (SWEEP_DIR [RUN_DIR ...])."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transferlab.report.agreement import ranked_backbones, write_agreement
from transferlab.report.analysis import check_arm
from transferlab.report.compare import DEFAULT_ARM, set_apart
from transferlab.report.output import remove_stale_selection, write_report, write_selection
from transferlab.report.runs import (
    UnfinishedJob,
    find_jobs,
    is_run,
    load_finished,
    load_unfinished,
    overrides_text,
)
from transferlab.report.selection import Rule, choice_lines, parse_rule, select
from transferlab.report.stats import CI_METHODS, PAIRED_TESTS, Options
from transferlab.utils.errors import UserError, exit_with


class CommandLine(argparse.ArgumentParser):
    """argparse whose usage errors are one `transferlab: error: ...` line, like every other bad input."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        exit_with(UserError(f"{message} (see {self.prog} --help)"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        options = stats_options(args)
        rule = selection_rule(args)
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
        check_arm(runs, options, given=args.arms is not None)  # before anything is written
        selection = select(runs, rule) if rule else None  # so is every bad --select-by
        ranked = ranked_backbones(args.rank, runs) if args.rank else None  # and a rank.csv it cannot read
        if selection and not selection.over_given:
            print(f"--over not given: choosing over {','.join(selection.over)}", flush=True)
        out_dir = args.out or default_out_dir(args.paths)
        written = write_report(runs, out_dir, sources=args.paths, unfinished=unfinished, options=options)
        if selection:
            written.update(write_selection(selection, out_dir))
            print("\n".join(choice_lines(selection)), flush=True)
        else:
            remove_stale_selection(out_dir)  # an earlier report's choice must not stand beside these runs
        if args.rank:
            written["rank_agreement"], agreement_text = write_agreement(args.rank, runs, out_dir, ranked)
            print(agreement_text, flush=True)
    except UserError as error:
        exit_with(error)
    for path in written.values():
        print(path)
    for line in unfinished_lines(unfinished):
        print(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandLine(
        prog="transferlab-report",
        description="Tables and plots comparing finished transferlab runs (a sweep dir, or run dirs).",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="SWEEP_DIR_OR_RUN_DIR")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the report (default: the sweep dir, else the current dir)",
    )
    parser.add_argument(
        "--rank",
        type=Path,
        default=None,
        metavar="RANK_CSV",
        help="a rank.csv of python -m transferlab.rank: adds rank_agreement.md, each score against the runs' "
        "mean test accuracy per backbone, with Kendall's tau-b and the weighted tau",
    )
    parser.add_argument(
        "--ci",
        default="t",
        metavar="{t,bootstrap}",
        help="the 95%% interval of a mean over seeds and of a paired difference: t (Student's t, default) or "
        "bootstrap (percentile bootstrap, 10,000 resamples; unreliable below about 5 seeds)",
    )
    parser.add_argument(
        "--bootstrap-seed", default="0", metavar="N", help="seed of the bootstrap resamples (default 0)"
    )
    parser.add_argument(
        "--arms",
        default=None,
        metavar="KEY",
        help=f"the setting whose values are the arms of the paired differences (default {DEFAULT_ARM}; e.g. experiment)",
    )
    parser.add_argument(
        "--paired-test",
        default="t",
        metavar="{t,permutation}",
        help="the two-sided test of a paired difference: t (paired t-test, default) or permutation (exact sign-flip test)",
    )
    parser.add_argument(
        "--select-by",
        default=None,
        metavar="METRIC[:min]",
        help="choose a setting on validation: within each value of the --per keys, the setting of the --over "
        "keys with the best mean METRIC over the seeds they share (maximized; METRIC:min minimizes); "
        "writes selected.csv and selected.md. Never a test/ metric",
    )
    parser.add_argument(
        "--per",
        default=None,
        metavar="KEY[,KEY]",
        help="with --select-by: what each choice is made within (e.g. mode, or experiment)",
    )
    parser.add_argument(
        "--over",
        default=None,
        metavar="KEY[,KEY]",
        help="with --select-by: the keys whose setting is chosen (default: every key that differs "
        "except the seeds and the --per keys)",
    )
    return parser.parse_args(argv)


def stats_options(args: argparse.Namespace) -> Options:
    """The statistics flags, checked: a bad value is one line, before any run is read."""
    if args.ci not in CI_METHODS:
        raise UserError(
            f"--ci {args.ci}: choose one of {', '.join(CI_METHODS)} (t-interval or percentile bootstrap)"
        )
    if args.paired_test not in PAIRED_TESTS:
        raise UserError(
            f"--paired-test {args.paired_test}: choose one of {', '.join(PAIRED_TESTS)} (paired t-test or exact sign-flip permutation test)"
        )
    try:
        seed = int(args.bootstrap_seed)
    except ValueError:
        seed = -1
    if seed < 0 or seed >= 2**32:
        raise UserError(f"--bootstrap-seed {args.bootstrap_seed}: give a whole number from 0 to {2**32 - 1}")
    arms = DEFAULT_ARM if args.arms is None else args.arms.strip()
    if not arms or any(c.isspace() for c in arms) or "=" in arms:
        raise UserError(f"--arms {args.arms!r}: give one setting key, e.g. --arms mode or --arms experiment")
    return Options(ci=args.ci, bootstrap_seed=seed, arms=arms, paired_test=args.paired_test)


def selection_rule(args: argparse.Namespace) -> Rule | None:
    """--select-by, --per and --over, checked as far as they can be before any run is read."""
    return parse_rule(args.select_by, args.per, args.over)


def default_out_dir(paths: list[Path]) -> Path:
    """The sweep dir when the first argument is one (not itself a run), else the current dir."""
    first = Path(paths[0])
    return first if not is_run(first) else Path.cwd()


def unfinished_lines(jobs: list[UnfinishedJob]) -> list[str]:
    """What the command prints: one line per job that did not finish."""
    if not jobs:
        return []
    lines = [f"{len(jobs)} job{'s' if len(jobs) > 1 else ''} did not finish (not in the tables):"]
    lines += [
        f"  {job.status}: {job.path} [{overrides_text(job.overrides)}]: {job.explanation}" for job in jobs
    ]
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
