"""Why a record has no features: one :class:`SkipReason` from the encoder to the store to the
report (docs/design.md, "The store").

A reason is a string (``"missing-image"``) everywhere in Python and JSON, and a stable int8
code in ``store/skipped.npy`` (0: not skipped). The codes are part of the store format: a new
reason takes the next free code, and none is ever renumbered.
"""

from __future__ import annotations

from enum import Enum


class SkipReason(str, Enum):
    """Why a record could not be scored; compares, hashes and prints as its text."""

    MISSING_IMAGE = "missing-image"  # an image file is absent
    NO_SUPERVISED_TOKEN = "no-supervised-token"  # nothing left to learn after truncation
    NON_FINITE = "non-finite"  # the gradient, its norm or the loss is not finite
    ERROR = "error"  # an image that cannot be read or processed, or embedded in the data
    IMAGE_COUNT_MISMATCH = "image-count-mismatch"  # placeholders ≠ images
    IMAGE_OUTSIDE_USER_TURN = "image-outside-user-turn"  # <image> in a system/assistant turn
    TOO_LONG_FOR_IMAGE = "too-long-for-image"  # truncation would cut an image's tokens
    IMAGE_IN_TEXT_MODEL = "image-in-text-model"  # a record with images for a text-only model

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def code(self) -> int:
        """The reason's int8 code in ``skipped.npy``."""
        return CODES[self]

    @classmethod
    def from_code(cls, code: int) -> SkipReason:
        """The reason stored as ``code`` (≥ 1)."""
        return BY_CODE[int(code)]


# The store's codes: fixed forever (stores on disk hold them).
CODES = {SkipReason.MISSING_IMAGE: 1, SkipReason.NO_SUPERVISED_TOKEN: 2, SkipReason.NON_FINITE: 3,
         SkipReason.ERROR: 4, SkipReason.IMAGE_COUNT_MISMATCH: 5,
         SkipReason.IMAGE_OUTSIDE_USER_TURN: 6, SkipReason.TOO_LONG_FOR_IMAGE: 7,
         SkipReason.IMAGE_IN_TEXT_MODEL: 8}
BY_CODE = {code: reason for reason, code in CODES.items()}
