"""The memory planner: ``dmdr-fast plan`` counts a run's per-GPU memory without loading a model.

:mod:`~dmdr_fast.plan.architectures` builds the networks on the meta device,
:mod:`~dmdr_fast.plan.memory` counts them and models activations, :mod:`~dmdr_fast.plan.runs`
applies a config, :mod:`~dmdr_fast.plan.measure` measures real CPU peaks (the validation), and
:mod:`~dmdr_fast.plan.command` prints the table. docs/plan.md explains the model.
"""
