"""The inference modes, in one place: ``zoom_out_zoom_in`` (the default: zoom-out, then sliding windows at native
resolution where there is something to segment) and ``zoom_out`` (the fast preview: one encoder forward). The engine,
the app's ``--conf zoom`` and per-request ``zoom``, and the scripts' ``--mode`` choices all read them from here.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

from .errors import BadRequestError


class Mode(str, Enum):
    ZOOM_OUT_ZOOM_IN = "zoom_out_zoom_in"
    ZOOM_OUT = "zoom_out"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any, what: str = "mode") -> "Mode":
        """A mode name (or a ``Mode``) -> ``Mode``; anything else is a ``BadRequestError`` naming ``what``."""
        try:
            return cls(value)
        except ValueError:
            raise BadRequestError(f"{what} must be one of {', '.join(repr(m) for m in MODES)}, got "
                                  f"{str(value)[:40]!r}") from None


MODES = tuple(m.value for m in Mode)  # the names, for argparse choices and messages
DEFAULT_MODE = Mode.ZOOM_OUT_ZOOM_IN
