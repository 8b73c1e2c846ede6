"""The command line before Hydra: overrides checked and composed (`cli.overrides`), sweeps that
survive their jobs (`cli.sweeps`), what the argparse commands share (`cli.args`).

Imported by the commands (train, predict, export, rank); never by the layers below.
"""
