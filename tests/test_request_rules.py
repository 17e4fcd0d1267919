"""The app's request rules that have one home (``apps/segvol/lib/validation.py``): a boolean means the same in every
request field and ``--conf`` option (``result_compress: "off"`` used to compress)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from _server import APP

from segvol.errors import BadRequestError

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
