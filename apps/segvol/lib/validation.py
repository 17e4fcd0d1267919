"""The single home of request rules shared by the HTTP checks (``segvol_server_checks``) and the app (``main``, the
infer tasks): what an image id, a label id or a label tag may be (the rules that keep a client inside the datastore),
what a boolean option may say (``parse_bool``), which model and image a request may name (``check_model``,
``check_image``) and which result formats exist (``check_result_extension``).

Every name a client sends that becomes part of a path (``image``, ``id``, ``label``, ``tag``, ``label_tag``) must be a
plain file-name-like token: no path separator, no ``..``, no NUL or other control character, not absolute, not empty,
at most ``MAX_ID_LENGTH`` characters. DICOM UIDs (``1.2.840...``) and file stems (``example_ct``) pass.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from fastapi import HTTPException

from segvol.errors import BadRequestError

MAX_ID_LENGTH = 200
_ALLOWED = re.compile(r"^[A-Za-z0-9._+\-][A-Za-z0-9._+\- ]*$")


class UnsafeNameError(BadRequestError):
    """An id or tag that could name a file outside the datastore (HTTP 400)."""

    http_status = 400


def check_name(value: Any, field: str) -> str:
    """``value`` if it is a safe datastore id/tag, else ``UnsafeNameError`` naming ``field``."""
    if not isinstance(value, str):
        raise UnsafeNameError(f"{field} must be a string id, got {type(value).__name__}")
    if not value:
        raise UnsafeNameError(f"{field} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise UnsafeNameError(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if value in (".", "..") or ".." in value or not _ALLOWED.match(value) or value != value.strip():
        raise UnsafeNameError(f"{field} {value[:80]!r} is not a datastore id: use letters, digits, '.', '_', '-', "
                              "'+' only (no path separators, '..', NUL or control characters)")
    return value


def is_safe_name(value: Any) -> bool:
    try:
        check_name(value, "name")
        return True
    except UnsafeNameError:
        return False


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def parse_bool(value: Any, field: str, default: bool) -> bool:
    """A boolean request field or ``--conf`` option: ``default`` when absent (None or ""), a JSON boolean, 0 or 1, or
    one of ``true/false, 1/0, yes/no, on/off`` in any case; anything else is ``BadRequestError`` naming ``field``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise BadRequestError(f"{field} must be true or false (also 1/0, yes/no, on/off), got {str(value)[:40]!r}")


# Label formats a result is written in (``result_extension``): 3-D formats ITK writes with the image's geometry.
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def check_result_extension(extension: Any) -> str:
    """The requested result format (default ``.nii.gz``), or ``BadRequestError``."""
    if extension in (None, ""):
        return ".nii.gz"
    if extension not in RESULT_EXTENSIONS:
        raise BadRequestError(f"params.result_extension must be one of {list(RESULT_EXTENSIONS)}, got "
                              f"{str(extension)[:20]!r}")
    return extension


def check_model(model: Any, available: Iterable[str], what: str = "model") -> str:
    """``model`` if it is one of ``available``, else a 404 listing them."""
    names = sorted(available)
    if model not in names:
        raise HTTPException(status_code=404, detail=f"unknown {what} {str(model)[:80]!r}; available: {names}")
    return model


def check_image(datastore, image: Any, field: str = "image") -> str:
    """``image`` if it is a safe id the datastore lists, else a 4xx naming ``field`` (the listing only: a DICOMweb
    datastore downloads a series when its file is asked for). A datastore that cannot be asked is a 502."""
    check_name(image, field)
    try:
        known = image in set(datastore.list_images())
    except Exception as error:  # a DICOMweb server that does not answer
        raise HTTPException(status_code=502, detail=f"the datastore did not answer: {error}") from None
    if not known:
        raise HTTPException(status_code=404, detail=f"{field} {image!r} not found in the datastore")
    return image
