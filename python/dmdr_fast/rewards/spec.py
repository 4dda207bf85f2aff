"""What defines one reward's loss: :class:`RewardSpec`, taken whole by every reward.

A reward is three separate things:

* its **model** — a classifier, a CLIP model, a function — and the model's own arguments
  (``mode``, ``scale``, ``crop``, ...): the reward class's constructor arguments;
* its **definition**, the same for every reward: a :class:`RewardSpec` — the log name, the loss
  form ``ℓ = −score`` (``neg``) or ``ℓ = relu(margin − score)`` (``hinge``), the weight λ_R of
  that loss, and the prefix put before every prompt it scores (docs/method.md §7);
* how its gradient joins the DMD gradient — ``combine``, ``ratio``, ``max_weight`` (and the
  weight, again, for ``fixed``): *combination policy*. That is configuration, not part of the
  reward: the Trainer reads it from ``config.rewards`` into
  :class:`dmdr_fast.algo.generator.RewardPolicy` and passes it to
  :func:`dmdr_fast.ops.reward_grad_combine` (docs/method.md §7). A reward without a config entry
  is combined ``fixed`` at its own ``spec.weight``, and a ``fixed`` config entry whose weight is
  not the reward's ``spec.weight`` is refused, so the logged reward loss is the one that trains.

**Adding a shared option** (one every reward has) takes one change here plus the config field:

1. add the field to :class:`RewardSpec`, with a default that keeps today's behaviour and its check
   in :meth:`RewardSpec.__post_init__`, and use it where the reward computes (``self.spec.<field>``);
2. add the same-named field to ``dmdr_fast.config.RewardConfig`` (a different config name goes
   into ``_CONFIG_NAMES`` below).

Nothing else needs to know: every reward class takes ``spec=`` whole and passes it to
:class:`~dmdr_fast.rewards.base.Reward`; :meth:`RewardSpec.from_config` reads every field of the
spec from a config entry by name (the registry's :func:`~dmdr_fast.rewards.reward_from_config`
and the digits recipe both build the spec with it); :func:`~dmdr_fast.rewards.build_reward` takes
the fields as keywords by looking them up in :func:`spec_fields`, and the registry's builders take
the spec whole. ``tests/rewards/test_spec.py`` checks that every field has its config counterpart.

This module imports neither ``dmdr_fast.config`` nor ``dmdr_fast.train``: :meth:`from_config` reads
the fields of any object that has them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LOSS_FORMS", "LossForm", "RewardSpec", "config_field", "spec_fields"]

LossForm = Literal["neg", "hinge"]
#: The supported loss forms.
LOSS_FORMS: tuple[str, ...] = ("neg", "hinge")

# RewardSpec field -> the name of the same setting in dmdr_fast.config.RewardConfig, where they differ.
_CONFIG_NAMES: dict[str, str] = {"loss_form": "form"}


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RewardSpec:
    """The definition of one reward's loss, shared by every reward (the model is separate).

    The per-sample loss of a reward with score ``s`` is ``weight · (−s)`` (``loss_form="neg"``)
    or ``weight · relu(margin − s)`` (``"hinge"``; the authors' text-to-image form, margin 0.7 for
    CLIP/HPS cosine scores: no push once a sample is good enough).

    Attributes:
        name: Key in logs (``reward/<name>``); unique inside a
            :class:`~dmdr_fast.rewards.CompositeReward`; the Trainer matches it with the
            ``config.rewards`` entry (``entry.name`` or else ``entry.kind``).
        weight: λ_R, the multiplier of this reward's loss (a finite number).
        loss_form: ``"neg"`` (``−score``) or ``"hinge"`` (``relu(margin − score)``).
        margin: The hinge margin, in the units of the score (unused by ``"neg"``).
        prompt_prefix: Text put before every prompt before the reward sees it (the authors score
            HPS on ``"Realistic photo " + prompt``); ignored for class-label conditions.

    Raises:
        ValueError: A field has a bad value; the message names ``RewardSpec.<field>``.
    """

    name: str
    weight: float = 1.0
    loss_form: LossForm = "neg"
    margin: float = 0.0
    prompt_prefix: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardSpec.name must be a non-empty string, got {self.name!r}")
        if not _finite_number(self.weight):
            raise ValueError(f"RewardSpec.weight must be a finite number, got {self.weight!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"RewardSpec.loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        if not _finite_number(self.margin):
            raise ValueError(f"RewardSpec.margin must be a finite number, got {self.margin!r}")
        if not isinstance(self.prompt_prefix, str):
            raise ValueError(
                f"RewardSpec.prompt_prefix must be a string, got {type(self.prompt_prefix).__name__}"
            )
        # Numbers are stored as floats (an int weight from YAML gives the same spec as its float).
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "margin", float(self.margin))

    @classmethod
    def from_config(cls, entry: Any) -> RewardSpec:
        """The spec of one ``config.rewards`` entry (a :class:`dmdr_fast.config.RewardConfig`).

        Every field is read from the entry's attribute of the same name (:func:`config_field`:
        ``loss_form`` from ``form``); ``name`` is the entry's ``name`` or else its ``kind``, the key
        by which the Trainer finds the entry again. Any object with these attributes works.

        Raises:
            ValueError: A field has a bad value (names it).
        """
        values = {f: getattr(entry, config_field(f)) for f in spec_fields()}
        if values["name"] is None:
            values["name"] = entry.kind
        return cls(**values)

    @classmethod
    def split(cls, kwargs: Mapping[str, Any], *, default_name: str) -> tuple[RewardSpec, dict[str, Any]]:
        """``(spec, rest)``: a spec from the keyword arguments named like its fields, and the others.

        ``name`` missing or ``None`` gives ``default_name``. Lets a builder accept the spec's fields
        as keywords without listing them, so a new field needs no change there.
        """
        fields = spec_fields()
        values = {k: v for k, v in kwargs.items() if k in fields}
        rest = {k: v for k, v in kwargs.items() if k not in fields}
        if values.get("name") is None:
            values["name"] = default_name
        return cls(**values), rest


def spec_fields() -> tuple[str, ...]:
    """The names of :class:`RewardSpec`'s fields, in order."""
    return tuple(f.name for f in dataclasses.fields(RewardSpec))


def config_field(field: str) -> str:
    """The ``RewardConfig`` attribute that holds the spec field ``field`` (``loss_form`` → ``form``)."""
    return _CONFIG_NAMES.get(field, field)
