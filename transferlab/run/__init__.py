"""One run, from a built assembly to its results: fit or solve (`run.fit`), resume (`run.resume`),
results and metrics.json (`run.results`), per-class results (`run.confusion`), the training budget
(`run.budget`), HParams (`run.hparams`), provenance (`run.provenance`), Ctrl-C during a run (`run.interrupts`).

Imported by `build` (the checks: budget, resume, optimized metric), `cli` (resume before Hydra) and the commands.
"""
