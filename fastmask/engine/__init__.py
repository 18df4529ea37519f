"""The training engine behind ``python -m fastmask.train``; ``fastmask.train`` is its thin CLI.

* ``loop``         - ``Trainer``: schedules, the optimizer step over ``optim.accum_steps``
                     micro-batches, the epoch loop, logging;
* ``distributed``  - process group from torchrun, DDP around the trained modules, FSDP2 sharding,
                     ranks that fail together;
* ``checkpoint``   - atomic checkpoints of full state dicts with every rank's RNG state;
* ``evaluation``   - weighted k-NN, the method's validation accuracy, attention-map images;
* ``optim``        - optimizers, parameter groups, gradient clipping;
* ``guard``        - skipping non-finite steps, the AMP policy;
* ``preflight``    - every user-facing check before anything is written;
* ``loggers``, ``progress`` - Weights & Biases, the progress bar;
* ``auto_teacher`` - ``method.teacher.checkpoint=auto`` (a teacher trained once and cached);
* ``data``         - building loaders, epochs and batches.
"""
from .loop import Trainer, cosine_schedule, step_seed, train

__all__ = ["Trainer", "cosine_schedule", "step_seed", "train"]
