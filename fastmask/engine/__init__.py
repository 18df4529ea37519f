"""The training engine behind ``python -m fastmask.train``: the loop, evaluation, distributed set-up
(DDP/FSDP2), checkpoints with RNG state, optimisation helpers and compilation of the training step.
``fastmask.train`` is the thin CLI over it.
"""
