"""The algorithm, hf_gam's bottom floor: it imports nothing else of hf_gam.

- :mod:`~hf_gam.core.functional`: pure tensor math on lists of tensors (norms, dots, perturb/restore, HVPs, the
  ``h-`` decomposition), foreach kernels, the SDPA math-kernel context for double backward.
- :mod:`~hf_gam.core.directions`: the update direction of every mode as a pure function of gradient oracles; the
  mode registry ``MODES`` (:class:`~hf_gam.core.directions.ModeSpec`) and :class:`~hf_gam.core.directions.GAMHyper`.
- :mod:`~hf_gam.core.oracles`: "the loss of these inputs at the current weights" turned into gradients / HVPs over
  one micro-batch or a whole window, with the BatchNorm guard.
- :mod:`~hf_gam.core.collectives`: the one place that knows about processes (``world_size``, all-reduces).
- :mod:`~hf_gam.core.step`: the dispatcher ``run_passes`` (safety rules) and the step driver
  ``apply_direction_step`` shared by ``GAMTrainer``, ``hf_gam.optim.GAM`` and custom loops.
"""
