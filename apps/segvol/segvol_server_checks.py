"""What ``segvol_server`` checks before a request reaches MONAI Label: one function per endpoint, each raising a 4xx
that names the field.

A check runs before any heavy work (before the inference queue, before an upload is copied into the datastore).
Names that become paths go through ``lib.validation.check_name``; request bodies must be JSON objects of bounded size
whose numbers are finite; train, scoring and batch requests accept only their documented keys, with types and ranges,
so nothing a client sends reaches a subprocess's environment (MONAI Label puts a train request's ``bundle_path`` on
the training subprocess's ``PYTHONPATH``) or a file path it did not come from.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List

from fastapi import HTTPException

from segvol.errors import BadImageError, BadPromptError, BadRequestError
from segvol.modes import MODES

MAX_STRING = 10_000
MAX_LIST = 100_000
MAX_DEPTH = 8
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
PATH_LIKE_QUERY = ("image", "id", "label", "tag", "label_tag")
CHECKED_PREFIXES = ("/datastore", "/infer", "/activelearning", "/scoring", "/train", "/batch", "/session", "/model")
POINT_FIELDS = ("points", "foreground", "background")
TRAIN_PASSTHROUGH = ("client_id", "model")
BATCH_KEYS = ("device", "multi_gpu", "gpus", "logging", "save_label", "label_tag", "max_workers", "max_batch_size",
              "client_id")
SCORING_KEYS = ("client_id", "force")
# Ranges of the trainer's numeric options (the trainer's config() gives the keys and the types).
TRAIN_RANGES = {
    "max_epochs": (1, 100_000), "train_batch_size": (1, 1024), "repeats": (1, 10_000), "seed": (0, 2**31 - 1),
    "learning_rate": (1e-12, 1.0), "val_split": (0.0, 0.9), "minutes": (0.0, 7 * 24 * 60),
    "pseudo_weight": (0.0, 100.0),
}
TRAIN_CHOICES = {
    "init": ("auto", "official", "scratch", "published"),
    "scratch_config": ("small", "official"),
    "val_mode": MODES,
    "loss_resolution": ("full", "low"),
    "resume": ("auto", "true", "false", True, False),
}


def app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def check_name(value: Any, field: str) -> str:
    from lib.validation import check_name as rule  # the app's ``lib`` (loaded by MONAI Label with the app)

    return rule(value, field)


def not_found(detail: str) -> HTTPException:
    return HTTPException(status_code=404, detail=detail)


def too_large(detail: str) -> HTTPException:
    return HTTPException(status_code=413, detail=detail)


# ----------------------------------------------------------------------------------------------------------------------
# generic shapes
# ----------------------------------------------------------------------------------------------------------------------
def parse_object(text: Any, field: str, policy) -> Dict[str, Any]:
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        value = text
    else:
        if len(text) > policy.max_json_bytes:
            raise too_large(f"{field} is {len(text)} bytes, over the limit of {policy.max_json_bytes} "
                            "(--conf max_params_kb)")
        try:
            value = json.loads(text)
        except ValueError as error:
            raise BadRequestError(f"{field} must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"{field} must be a JSON object, got {type(value).__name__}")
    check_values(value, field)
    return value


def check_values(value: Any, field: str, depth: int = 0) -> None:
    """Finite numbers, bounded strings and lists, bounded nesting, all the way down."""
    if depth > MAX_DEPTH:
        raise BadRequestError(f"{field} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadPromptError(f"{field} must be a finite number, got {value}")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise too_large(f"{field} is a string of {len(value)} characters, over the limit of {MAX_STRING}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_values(item, f"{field}.{key}", depth + 1)
    elif isinstance(value, list):
        if len(value) > MAX_LIST:
            raise too_large(f"{field} has {len(value)} entries, over the limit of {MAX_LIST}")
        for number, item in enumerate(value):
            check_values(item, f"{field}[{number}]", depth + 1)


def check_bool(value: Any, field: str) -> None:
    from lib.validation import parse_bool  # the app's ``lib`` (loaded by MONAI Label with the app)

    parse_bool(value, field, False)


def check_keys(params: Dict[str, Any], allowed, field: str) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise BadRequestError(f"{field}: unknown keys {[k[:40] for k in unknown][:10]}; accepted: {sorted(allowed)}")


def check_image_id(image: Any, field: str = "image") -> str:
    from lib.validation import check_image  # the app's ``lib`` (loaded by MONAI Label with the app)

    return check_image(app().datastore(), image, field)


def check_model(model: Any, available, what: str = "model") -> str:
    from lib.validation import check_model as rule

    return rule(model, available, what)


# ----------------------------------------------------------------------------------------------------------------------
# query parameters (run by the gate, before the request is parsed)
# ----------------------------------------------------------------------------------------------------------------------
def check_query(method: str, path: str, query: Dict[str, List[str]], policy) -> None:
    if path.startswith("/proxy/dicom"):
        from monailabel.datastore.dicom import DICOMWebDatastore

        if not isinstance(app().datastore(), DICOMWebDatastore):
            raise not_found("/proxy/dicom relays a DICOMweb datastore (--studies http://...); this server's datastore "
                            "is a local folder: read images with GET /datastore/image")
        return
    if not path.startswith(CHECKED_PREFIXES) and not path.startswith("/logs"):
        return
    for key in PATH_LIKE_QUERY:
        for value in query.get(key, []):
            if key == "image" and path.startswith("/infer") and policy.allow_local_paths and os.path.isabs(value):
                continue
            if key == "image" and path.startswith("/infer") and (os.path.isabs(value) or os.sep in value):
                raise BadRequestError("image must be a datastore id (absolute paths are refused unless the server runs "
                                      "with --conf allow_local_paths true)")
            check_name(value, key)
    if path.startswith("/logs"):
        for key, (low, high) in {"lines": (0, 100_000), "refresh": (0, 3600)}.items():
            for value in query.get(key, []):
                if not value.isdigit() or not low <= int(value) <= high:
                    raise BadRequestError(f"{key} must be an integer from {low} to {high}, got {value[:20]!r}")


# ----------------------------------------------------------------------------------------------------------------------
# endpoints
# ----------------------------------------------------------------------------------------------------------------------
def check_infer(kwargs: Dict[str, Any], policy) -> None:
    instance = app()
    check_model(kwargs.get("model"), instance._infers)
    params = parse_object(kwargs.get("params"), "params", policy)
    image, session_id = kwargs.get("image") or "", kwargs.get("session_id") or ""
    if session_id:
        check_name(session_id, "session_id")
    if image and not (policy.allow_local_paths and os.path.isabs(image)):
        check_image_id(image)
    elif image and not os.path.isfile(image):
        raise not_found(f"image {image[:200]!r} is not a file on the server")
    elif not image and not kwargs.get("file") and not session_id:
        raise BadRequestError("image is required: a datastore id (or upload the image as 'file')")
    if params.get("image") not in (None, "", image):
        raise BadRequestError(f"params.image ({str(params['image'])[:80]!r}) names another image than the query's "
                              f"image ({image[:80]!r}): give the image once, as the query parameter")
    check_binary_label(kwargs.get("label"), image, session_id)
    for flag in ("save_label", "result_compress", "free_text"):
        check_bool(params.get(flag), f"params.{flag}")
    if params.get("label_tag") not in (None, ""):
        check_name(params["label_tag"], "params.label_tag")
    from lib.validation import check_result_extension  # the app's ``lib`` (loaded by MONAI Label with the app)

    check_result_extension(params.get("result_extension"))
    output = getattr(kwargs.get("output"), "value", kwargs.get("output"))
    if output == "dicom_seg":
        from monailabel.datastore.dicom import DICOMWebDatastore

        if not isinstance(instance.datastore(), DICOMWebDatastore):
            raise BadRequestError("output=dicom_seg needs a DICOMweb datastore (--studies http://...); use "
                                  "output=image")
        if not params.get("label_info"):
            raise BadRequestError("output=dicom_seg needs params.label_info naming the segments")
    points = 0
    for field in POINT_FIELDS:
        value = params.get(field)
        if isinstance(value, list):
            points += len(value)
        elif value not in (None, ""):
            raise BadPromptError(f"params.{field} must be a list of [i, j, k] points")
    if points > policy.max_points:
        raise too_large(f"{points} points in one request, over the limit of {policy.max_points} (--conf max_points)")
    from lib.prompts import label_prompt_indices

    label_prompt = label_prompt_indices(params.get("label_prompt"))
    if len(label_prompt) > policy.max_names:
        raise too_large(f"params.label_prompt has {len(label_prompt)} entries, over the limit of "
                        f"{policy.max_names} (--conf max_names)")
    texts = params.get("texts")
    if isinstance(texts, list) and len(texts) > policy.max_names:
        raise too_large(f"params.texts has {len(texts)} names, over the limit of {policy.max_names}")


def check_binary_label(upload: Any, image: str, session_id: str) -> None:
    """A ``label`` upload named ``*.bin`` (OHIF's scribbles: one uint8 per voxel, in Fortran order) is turned into a
    volume on the image's grid by MONAI Label before the app sees it: its size must be the image's voxel count."""
    filename = getattr(upload, "filename", "") or ""
    if not upload or not filename.lower().endswith(".bin"):
        return
    if not image or session_id or os.path.isabs(image):
        raise BadRequestError("a binary label (.bin) needs the image as a datastore id (the query's image)")
    from lib.datastore import volume_shape  # the app's ``lib`` (loaded by MONAI Label with the app)

    shape = volume_shape(app().datastore().get_image_uri(image))
    upload.file.seek(0, os.SEEK_END)
    size = upload.file.tell()
    upload.file.seek(0)
    if size != math.prod(shape):
        raise BadImageError(f"label: a binary label (.bin) holds one byte per voxel: {math.prod(shape)} bytes for the "
                            f"image {image!r} of shape {list(shape)}, got {size}")


def check_add_image(kwargs: Dict[str, Any], policy) -> None:
    upload = kwargs.get("file")
    filename = os.path.basename(getattr(upload, "filename", "") or "")
    extension = next((e for e in IMAGE_EXTENSIONS if filename.lower().endswith(e)), None)
    if extension is None:
        raise BadRequestError(f"file must be an image file ({', '.join(IMAGE_EXTENSIONS)}), got {filename[:80]!r}")
    check_name(kwargs.get("image") or filename[: -len(extension)], "image")
    parse_object(kwargs.get("params"), "params", policy)


def check_remove_image(kwargs: Dict[str, Any], policy) -> None:
    check_image_id(kwargs.get("id"), "id")


def check_save_label(kwargs: Dict[str, Any], policy) -> None:
    check_name(kwargs.get("tag") or "final", "tag")
    params = parse_object(kwargs.get("params"), "params", policy)
    label_info = params.get("label_info")
    if label_info is not None and (not isinstance(label_info, list) or
                                   not all(isinstance(item, dict) for item in label_info)):
        raise BadRequestError("params.label_info must be a list of {name, idx} objects")
    check_image_id(kwargs.get("image"))


def check_label_exists(label: Any, tag: Any, field: str) -> None:
    label, tag = check_name(label, field), check_name(tag, "tag")
    uri = app().datastore().get_label_uri(label, tag)
    if not uri or not os.path.isfile(uri):
        raise not_found(f"no label {label!r} with tag {tag!r}")


def check_remove_label(kwargs: Dict[str, Any], policy) -> None:
    check_label_exists(kwargs.get("id"), kwargs.get("tag"), "id")


def check_info_update(kwargs: Dict[str, Any], policy) -> None:
    parse_object(kwargs.get("info", kwargs.get("params")), "info", policy)
    if kwargs.get("image") is not None:
        check_image_id(kwargs["image"])


def check_image_info(kwargs: Dict[str, Any], policy) -> None:
    check_image_id(kwargs.get("image"))


def check_label_info(kwargs: Dict[str, Any], policy) -> None:
    check_label_exists(kwargs.get("label"), kwargs.get("tag"), "label")


def check_dataset(kwargs: Dict[str, Any], policy) -> None:
    limit = kwargs.get("limit_cases")
    if limit is not None and limit < 1:
        raise BadRequestError("limit_cases must be at least 1")
    if not app().datastore().datalist():
        raise not_found("no final labels in the datastore yet: nothing to put in a dataset archive")


def train_value_problem(key: str, value: Any, default: Any) -> str:
    """'' when ``value`` fits the option ``key`` whose default is ``default``; else what is wrong."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # MONAI Label clients send the chosen element of a list option
    if isinstance(default, bool):
        ok = isinstance(value, bool) or str(value).lower() in ("true", "false", "1", "0")
        return "" if ok else "must be true or false"
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return "must be a number"
        try:
            number = float(value)
        except ValueError:
            return "must be a number"
        if isinstance(default, int) and key in TRAIN_RANGES and number != int(number):
            return "must be an integer"
        low, high = TRAIN_RANGES.get(key, (-math.inf, math.inf))
        return "" if low <= number <= high else f"must be from {low} to {high}"
    if not isinstance(value, (str, bool)):
        return "must be a string"
    if key in TRAIN_CHOICES and value not in TRAIN_CHOICES[key] and str(value).lower() not in TRAIN_CHOICES[key]:
        return f"must be one of {[c for c in TRAIN_CHOICES[key] if isinstance(c, str)]}"
    if key == "name":
        check_name(value, "name")
    return ""


def check_train_params(model: str, params: Dict[str, Any]) -> None:
    check_model(model, app()._trainers, "trainer")
    defaults = app()._trainers[model].config()
    check_keys(params, list(defaults) + list(TRAIN_PASSTHROUGH), f"train request for {model}")
    for key, value in params.items():
        if key in TRAIN_PASSTHROUGH:
            continue
        problem = train_value_problem(key, value, defaults[key])
        if problem:
            raise BadRequestError(f"{key} {problem}, got {str(value)[:40]!r}")


def check_train(kwargs: Dict[str, Any], policy) -> None:
    params = parse_object(kwargs.get("params") or {}, "params", policy)
    check_train_params(kwargs.get("model"), params)


def check_train_all(kwargs: Dict[str, Any], policy) -> None:
    params = parse_object(kwargs.get("params") or {}, "params", policy)
    for model, request in params.items():
        if not isinstance(request, dict):
            raise BadRequestError(f"params.{model} must be an object of train options")
        check_train_params(model, request)


def check_scoring(kwargs: Dict[str, Any], policy) -> None:
    check_model(kwargs.get("method"), app()._scoring_methods, "scoring method")
    params = parse_object(kwargs.get("params") or {}, "params", policy)
    check_keys(params, SCORING_KEYS, "scoring request")
    check_bool(params.get("force"), "force")


def check_strategy(kwargs: Dict[str, Any], policy) -> None:
    # an unknown strategy is answered 404 by the app itself (SegVolApp.next_sample), for every caller
    params = parse_object(kwargs.get("params") or {}, "params", policy)
    if params.get("label_tag") not in (None, ""):
        check_name(params["label_tag"], "label_tag")


def check_batch_infer(kwargs: Dict[str, Any], policy) -> None:
    check_model(kwargs.get("model"), app()._infers)
    params = parse_object(kwargs.get("params") or {}, "params", policy)
    check_keys(params, BATCH_KEYS, "batch infer request")
    if params.get("label_tag") not in (None, ""):
        check_name(params["label_tag"], "label_tag")


def refuse_model_upload(kwargs: Dict[str, Any], policy) -> None:
    raise HTTPException(status_code=403, detail="replacing or deleting model files over HTTP is disabled in SegVol "
                                                "Label (a checkpoint is code to torch.load): train, or set --conf "
                                                "weights")


ENDPOINT_CHECKS = {
    ("POST", "/infer/{model}"): check_infer,
    ("PUT", "/datastore/image"): check_add_image,
    ("PUT", "/datastore/"): check_add_image,
    ("DELETE", "/datastore/image"): check_remove_image,
    ("DELETE", "/datastore/"): check_remove_image,
    ("PUT", "/datastore/label"): check_save_label,
    ("DELETE", "/datastore/label"): check_remove_label,
    ("PUT", "/datastore/image/info"): check_info_update,
    ("PUT", "/datastore/label/info"): check_info_update,
    ("PUT", "/datastore/updatelabelinfo"): check_info_update,
    ("GET", "/datastore/dataset"): check_dataset,
    ("GET", "/datastore/image/info"): check_image_info,
    ("GET", "/datastore/label/info"): check_label_info,
    ("POST", "/train/{model}"): check_train,
    ("POST", "/train/"): check_train_all,
    ("POST", "/scoring/{method}"): check_scoring,
    ("POST", "/activelearning/{strategy}"): check_strategy,
    ("POST", "/batch/infer/{model}"): check_batch_infer,
    ("PUT", "/model/{model}"): refuse_model_upload,
    ("DELETE", "/model/{model}"): refuse_model_upload,
}
