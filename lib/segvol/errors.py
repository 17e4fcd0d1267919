"""Typed errors for bad user input, so a server can answer HTTP 4xx (not 500) with the message as is.

Every class derives from ``SegVolInputError``, itself a ``ValueError``: ``except ValueError`` keeps working for
callers that do not know these types.
"""
from __future__ import annotations


class SegVolInputError(ValueError):
    """Something the caller sent cannot be segmented; the message says what and how to fix it."""

    http_status = 422


class BadImageError(SegVolInputError):
    """The image is unreadable, not 3-D, empty, constant or contains NaN/inf."""


class BadPromptError(SegVolInputError):
    """A point or box outside the image, an inverted box, malformed coordinates or point labels."""


class BadTextError(SegVolInputError):
    """An empty text list or an empty / non-string category name."""


class BadRequestError(SegVolInputError):
    """Inconsistent options: an unknown mode, a request with no prompt at all, an unsupported file type..."""


__all__ = ["SegVolInputError", "BadImageError", "BadPromptError", "BadTextError", "BadRequestError"]
