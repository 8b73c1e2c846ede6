"""`python -m transferlab.rank`: score pretrained backbones on a target's training images before
any fine-tuning (LogME and H-score on the features; LEEP and NCE from a source classifier), from their cached features (`rank.scores`, `rank.source`,
`rank.table`; the command line in `__main__`).

A command: imports the layers below it (build, cli, data, models, store, utils); imported by `report`
(the ranking agreement of `report --rank`).
"""
