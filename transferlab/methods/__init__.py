"""What trains and how: the modes and their facts (`methods.modes`: where frozen, finetune,
scratch, partial, gradual live), the linear probe and LP-FT's probe stage (`methods.probe`), and
the fine-tuning regularizers (`methods.regularizers`).

Imported by `build`, `run` and the conf/ targets (`transferlab.methods.modes.TrainAll`, ...).
"""
