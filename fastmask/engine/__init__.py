"""The training engine behind ``python -m fastmask.train``; ``fastmask.train`` is its thin CLI.

* ``loop``        - ``Trainer``: schedules, the optimisation step, the epoch loop, logging;
* ``evaluation``  - weighted k-NN accuracy and attention-map images;
* ``distributed`` - process group from torchrun, device, data-parallel gradient averaging;
* ``checkpoint``  - atomic checkpoints with every rank's RNG state (exact resume);
* ``data``        - building loaders, epochs and batches.
"""
from .loop import Trainer, cosine_schedule, step_seed, train

__all__ = ["Trainer", "cosine_schedule", "step_seed", "train"]
