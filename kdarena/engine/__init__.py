"""The training engine: building a run's parts, checkpoints, run records, LR schedules, the
per-step host transfer, epoch statistics, non-finite recovery, distributed helpers, the fused
(vmap) group and evaluation. The loop itself is :mod:`kdarena.trainer`."""
