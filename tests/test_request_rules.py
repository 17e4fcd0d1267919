"""The app's request rules that have one home (``apps/segvol/lib/validation.py``): a boolean means the same in every
request field and ``--conf`` option (``result_compress: "off"`` used to compress)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from _server import APP

from segvol.errors import BadPromptError, BadRequestError, BadTextError

sys.path.insert(0, str(APP))  # the app's own `lib` package, as MONAI Label imports it
from lib.infers.base import write_label_file  # noqa: E402
from lib.prompts import requested_free_text  # noqa: E402
from lib.validation import parse_bool  # noqa: E402


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False), (" yes ", True),
    ("no", False), ("On", True), ("off", False), ("1", True), ("0", False)])
def test_parse_bool_reads_every_spelling_of_true_and_false(value, expected):
    assert parse_bool(value, "params.flag", not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_parse_bool_gives_the_default_when_absent(default):
    assert parse_bool(None, "params.flag", default) is default
    assert parse_bool("  ", "params.flag", default) is default


@pytest.mark.parametrize("value", ["maybe", "2", 2, -1, 0.5, [], {}])
def test_parse_bool_refuses_anything_else_naming_the_field(value):
    with pytest.raises(BadRequestError, match="params.flag must be true or false"):
        parse_bool(value, "params.flag", False)


@pytest.mark.parametrize("flag, encoding", [(None, "gzip"), ("on", "gzip"), ("off", "raw"), (False, "raw"),
                                            ("no", "raw"), ("0", "raw")])
def test_result_compress_off_writes_a_raw_nrrd(flag, encoding):
    request = {"result_extension": ".nrrd"}
    if flag is not None:
        request["result_compress"] = flag
    path = write_label_file(np.ones((4, 5, 6), np.uint8), np.eye(4), request)
    try:
        with open(path, "rb") as handle:
            header = handle.read(400).split(b"\n\n")[0].decode("latin-1")
    finally:
        os.unlink(path)
    assert f"encoding: {encoding}" in header, header


def test_free_text_and_result_compress_refuse_words_that_are_not_booleans():
    assert requested_free_text({"free_text": "off"}) is False and requested_free_text({"free_text": "yes"}) is True
    assert requested_free_text({}) is False
    with pytest.raises(BadRequestError, match="params.free_text"):
        requested_free_text({"free_text": "sometimes"})
    with pytest.raises(BadRequestError, match="params.result_compress"):
        write_label_file(np.ones((2, 2, 2), np.uint8), np.eye(4), {"result_extension": ".nrrd",
                                                                    "result_compress": "gzip"})


def test_every_torch_load_in_the_project_states_weights_only():
    """A checkpoint is code to ``torch.load`` unless ``weights_only`` says otherwise: each call decides explicitly."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = []
    for folder in ("apps", "lib", "scripts", "tests"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                        and not any(k.arg == "weights_only" for k in node.keywords)):
                    missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not missing, missing


def test_prompt_fields_keep_the_numbers_sent_and_the_library_checks_them_once():
    from lib.prompts import PromptRequest, label_prompt_indices, parse_point, parse_slicer_roi

    assert parse_point([60.4, 50, 60.75], "foreground[0]") == (60.4, 50, 60.75)  # fractions are not rounded
    for bad in ([1, 2], ["1", 2, 3], [True, 2, 3], 5):
        with pytest.raises(BadPromptError, match=r"foreground\[0\]"):
            parse_point(bad, "foreground[0]")
    assert parse_slicer_roi([40, 30.5, 20, 80, 9, 70]) == (30.5, 20, 9, 40, 80, 70)
    asked = PromptRequest.from_clicks(texts=["liver"], positive=[(60.4, 50, 60.75)], box=(1, 2, 3, 40, 50, 60.5),
                                      requested=["liver"])
    assert asked.prompts.points == ((60.4, 50.0, 60.75, 1),) and asked.prompts.box[-1] == 60.5
    with pytest.raises(BadPromptError, match="finite"):  # the library's rule, the only finiteness check
        PromptRequest.from_clicks(positive=[(float("nan"), 1, 2)])
    # one label_prompt rule for the HTTP check and the tasks: whole numbers (also 2.0 and "3"), null kept
    assert label_prompt_indices([1, 2.0, "3", None]) == [1, 2, 3, None]
    assert label_prompt_indices(4) == [4] and label_prompt_indices(None) == []
    for bad in ([1.5], [True], ["liver"], {"a": 1}):
        with pytest.raises(BadTextError, match="label_prompt"):
            label_prompt_indices(bad)


def test_one_mapping_from_errors_to_http_answers():
    import json

    from fastapi import HTTPException
    from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelError, MONAILabelException

    from lib.http_errors import http_error
    from lib.service import WeightsUnavailableError
    from segvol.errors import BadImageError, BadPromptError

    cases = [(BadPromptError("p"), 422), (BadRequestError("r"), BadRequestError.http_status),
             (BadImageError("i"), 422), (WeightsUnavailableError("w"), 503),
             (ImageNotFoundException("gone"), 404),
             (MONAILabelException(MONAILabelError.SERVER_ERROR, "refused"), 400),
             (json.JSONDecodeError("Expecting value", "{x", 1), 400), (HTTPException(418, "teapot"), 418)]
    for error, status in cases:
        answer = http_error(error)
        assert answer.status_code == status and answer.detail, (error, answer)
    assert http_error(RuntimeError("a bug")) is None  # a server fault stays a 500


def test_model_and_image_rules_answer_404_502_and_400():
    from fastapi import HTTPException

    from lib.validation import UnsafeNameError, check_image, check_model

    assert check_model("segvol", {"segvol": 1, "segvol_auto": 2}) == "segvol"
    with pytest.raises(HTTPException) as raised:
        check_model("nope", {"segvol": 1}, "trainer")
    assert raised.value.status_code == 404 and "nope" in raised.value.detail and "segvol" in raised.value.detail

    class Listing:
        def __init__(self, images=None):
            self.images = images

        def list_images(self):
            if self.images is None:
                raise ConnectionError("PACS down")
            return self.images

    assert check_image(Listing(["ct"]), "ct") == "ct"
    with pytest.raises(HTTPException) as raised:
        check_image(Listing(["ct"]), "other")
    assert raised.value.status_code == 404 and "other" in raised.value.detail
    with pytest.raises(HTTPException) as raised:
        check_image(Listing(), "ct")
    assert raised.value.status_code == 502 and "PACS down" in raised.value.detail
    with pytest.raises(UnsafeNameError):
        check_image(Listing(["ct"]), "../ct")
