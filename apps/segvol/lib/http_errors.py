"""The one place where an error a request can cause becomes an HTTP answer (``http_error``): the app's ``infer``,
the server's exception handlers and its request gate all go through it."""
from __future__ import annotations

import json
from typing import Optional

from fastapi import HTTPException
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException

from segvol.errors import SegVolInputError

from .service import WeightsUnavailableError

MAX_DETAIL = 2000


def http_error(error: BaseException) -> Optional[HTTPException]:
    """The HTTP error answering ``error``, or None for a fault of the server (an HTTP 500)."""
    if isinstance(error, HTTPException):
        return error
    if isinstance(error, SegVolInputError):  # bad prompts, images, requests: each class has its status
        return HTTPException(status_code=error.http_status, detail=str(error)[:MAX_DETAIL])
    if isinstance(error, WeightsUnavailableError):  # the server runs, the model cannot: say how to get weights
        return HTTPException(status_code=503, detail=str(error)[:MAX_DETAIL])
    if isinstance(error, (ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(status_code=404, detail=str(getattr(error, "msg", error))[:MAX_DETAIL])
    if isinstance(error, json.JSONDecodeError):
        return HTTPException(status_code=400, detail=f"malformed JSON: {error.msg} at position {error.pos}")
    if isinstance(error, MONAILabelException):  # MONAI Label's own refusal of a request it could not use
        return HTTPException(status_code=400, detail=str(getattr(error, "msg", error))[:MAX_DETAIL])
    return None
