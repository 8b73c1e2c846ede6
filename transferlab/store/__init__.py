"""What a run leaves on disk: the run dir (`store.rundir.RunDir`, the one owner of its file names,
and the one reader of checkpoints), who may write it (`store.lock`: one command at a time, and only
the kind of command that made it), atomic writes and the cache root (`store.files`).

Imported by every layer above utils: `RunDir`, `read_checkpoint`, `transferlab_record`, `checkpoint_file`,
`checkpoint_path`, `resumes`, `write_atomically`, `cache_root`; `owned`, `check_owner` (the commands).
"""
