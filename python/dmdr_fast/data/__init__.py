"""Conditions for training: prompts, the prompt-embedding cache, and condition samplers.

(The digits data set of the demo lives with its recipe, :mod:`dmdr_fast.recipes.digits.data`.)
"""

from dmdr_fast.data.samplers import ClassLabelSampler, ConditionSampler

__all__ = ["ClassLabelSampler", "ConditionSampler"]
