"""Transition only: `transferlab.validate` dissolved into the owners of each check (issue 13).

Import from the new homes instead; this module goes once nothing imports it:
`transferlab.command_line` (before Hydra), `transferlab.resume` (run dir and resume),
`transferlab.settings` (the composed config: `check_config` and the pre-build type checks),
`transferlab.budget` (the trainer's budget), `transferlab.callbacks.freeze.check_mode`,
`transferlab.data.datamodule.check_data_root`.
"""

from transferlab.budget import check_training_budget, check_validates  # noqa: F401
from transferlab.callbacks.freeze import check_mode  # noqa: F401
from transferlab.command_line import check_command_line, command_line_overrides  # noqa: F401
from transferlab.data.datamodule import check_data_root  # noqa: F401
from transferlab.resume import ResumePlan, checkpoint_path, current_run_config, read_json  # noqa: F401
from transferlab.settings import check_config, check_mappings, check_numbers, check_seed, logged_metrics  # noqa: F401
