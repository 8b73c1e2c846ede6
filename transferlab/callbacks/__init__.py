"""Lightning callbacks that keep a run trustworthy and record it: guards (`callbacks.guards`: a
diverged loss, a resume of another model, the training clock, atomic checkpoint writes) and the
per-epoch log line (`callbacks.epoch_log`). What trains in an epoch is a mode's: `transferlab.methods.modes`.

Imported by `build`, `methods` and `run`, and named by conf/callbacks/*.yaml.
"""
