"""Data sets that ship offline; for now scikit-learn's 8×8 handwritten digits (the digits preset)."""

from dmdr_fast.data.digits import (
    DIGITS_IMAGE_SHAPE,
    DIGITS_NUM_CLASSES,
    DigitsSplits,
    digits_splits,
    load_digits_tensors,
    stratified_split,
    to_model_range,
    to_unit_range,
)

__all__ = [
    "DIGITS_IMAGE_SHAPE",
    "DIGITS_NUM_CLASSES",
    "DigitsSplits",
    "digits_splits",
    "load_digits_tensors",
    "stratified_split",
    "to_model_range",
    "to_unit_range",
]
