"""Checkpoints of a training run: written by `train`, read by `train` (to resume) and by
`inference` (the EMA params). `store`: the Orbax manager, save, verified restore; `checksums`:
the sums of every array that a restore checks."""
