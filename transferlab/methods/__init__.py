"""What trains and how: the modes (`methods.modes`: where frozen, finetune, scratch, partial,
gradual train; their facts, what each mode is, in `methods.mode_facts`), the linear probe and LP-FT's probe stage (`methods.probe`), and
the fine-tuning regularizers (`methods.regularizers`).

Imported by `build`, `run` and the conf/ targets (`transferlab.methods.modes.TrainAll`, ...).
"""
