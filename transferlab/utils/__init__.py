"""The ground: errors and the one-line refusal, quiet logs, network checks, numbers as reported.

Every layer may import from here: `utils.errors` (UserError, exit_with, ...), `utils.quietlogs`,
`utils.network`, `utils.numbers`. It imports nothing of transferlab.
"""
