"""`python -m transferlab` and the `transferlab` command: check the command line, then run Hydra.

Light on purpose: `--help`, a mistyped key, a value of the wrong type and a run dir that cannot be
used are answered from the command line and the composed config, before torch, Lightning and the
models are imported (they take seconds); `transferlab.train` runs each job.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from transferlab.cli.overrides import (
    check_command_line,
    resume_before_hydra,
    resume_overrides,
    run_dir_owned_before_hydra,
)
from transferlab.cli.sweeps import exit_if_jobs_failed
from transferlab.config import config_dir
from transferlab.store.lock import TRAIN
from transferlab.utils.errors import full_tracebacks_when_debugging, user_errors_as_one_line


def main() -> float | None:
    """Check the run dir and the command line, then run Hydra (each job: `transferlab.train`)."""
    full_tracebacks_when_debugging()
    argv = sys.argv[1:]
    # Before Hydra: it saves .hydra/config.yaml into the run dir before a job could refuse it.
    with user_errors_as_one_line():
        check_command_line(argv)
        added, plan = resume_before_hydra(argv)
        argv += added  # an older run resumes as it ran
        nothing_to_do = plan is not None and plan.nothing_to_do  # reads metrics.json: refused if broken
    if nothing_to_do:
        print(f"transferlab: {plan.describe()}", flush=True)  # and Hydra never starts: nothing written
        return None
    sys.argv = [sys.argv[0], *argv, *resume_overrides(argv)]
    # One owner of the run dir, taken before Hydra writes .hydra/ into it (store.lock).
    with run_dir_owned_before_hydra(argv, TRAIN):
        try:
            result = hydra_main()
        except SystemExit:
            exit_if_jobs_failed()  # a sweeper that gave up (Hydra printed why): still name the failed jobs
            raise
    exit_if_jobs_failed()  # after a sweep (-m): one summary line, exit 1
    return result


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from transferlab.train import run_job  # here: --help and Hydra's own refusals never import it

    return run_job(cfg)


if __name__ == "__main__":
    main()
