"""Fast image-encoder backends: the encoder is about 90 % of every request, the decoder stays float32 everywhere.

    model = segvol.load_model(checkpoint, precision="bf16")        # or later: segvol.accel.accelerate(model, "bf16")
    model.encoder_backend.describe()                                # what actually runs (after any fallback)

``precision`` is one of:

* ``fp32`` (the default): the PyTorch encoder in float32, exact (what ``tests/test_parity.py`` checks);
* ``bf16``: on CPU, the encoder converted to OpenVINO and run with bfloat16 inference precision (needs a CPU with
  native bfloat16: ``avx512_bf16`` or AMX; OpenVINO's CPU plugin must also list ``BF16``); on CUDA, PyTorch autocast
  to bfloat16 (float16 where the GPU has no bfloat16);
* ``fp16``: CUDA only, float16 autocast (on CPU it falls back to fp32);
* ``int8``: on CPU, OpenVINO with NNCF post-training int8 quantization calibrated on a few real CT views
  (``calibration``), the remaining ops in bfloat16 when the CPU has it, else float32. Not used by the server unless
  asked for (see docs/benchmarks.md for its measured accuracy).

A precision that cannot run here falls back to exact float32 with one WARNING line saying why (no OpenVINO, no native
bfloat16, not on this device); ``backend.precision`` is then ``"fp32"`` and ``backend.requested`` the precision asked
for.

OpenVINO models are converted once and cached on disk (``cache_dir``, default ``$SEGVOL_CACHE_DIR/openvino`` or
``~/.cache/segvol/openvino``) under a key made of a hash of the encoder's weights (so a fine-tuned checkpoint gets its
own converted model), the precision, the input shape, the calibration set (int8) and the OpenVINO version. Conversion
(about 10-40 s for the official encoder, minutes for int8 calibration) happens when the backend is built, i.e. when
the model is loaded, never during a request; it is logged with its progress. Files are written to a temporary folder
and renamed into place, so concurrent processes never read a half-written model.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from .io import fsync_file, replace_durably

logger = logging.getLogger("segvol.accel")

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CACHE_ENV = "SEGVOL_CACHE_DIR"


class PrecisionError(ValueError):
    """An unknown precision, or int8 without calibration views."""


def check_precision(precision: Optional[str]) -> str:
    value = (precision or "fp32").strip().lower()
    aliases = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "i8": "int8"}
    value = aliases.get(value, value)
    if value not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return value


# -------------------------------------------------------------------------------------------------------------------
# what this machine can do
# -------------------------------------------------------------------------------------------------------------------
def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def openvino_available() -> Optional[str]:
    """OpenVINO's version when it can be imported, else None."""
    try:
        import openvino  # noqa: F401
    except Exception as error:  # ImportError, or a broken install (missing shared library)
        logger.debug("openvino not importable: %s", error)
        return None
    return str(openvino.__version__).split("-")[0]


def cpu_bf16_native() -> bool:
    """True when the CPU computes bfloat16 natively (``avx512_bf16`` or AMX) and OpenVINO's CPU plugin agrees."""
    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    if openvino_available() is None:
        return True
    try:
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # pragma: no cover - plugin without the property
        return True


def default_server_precision(device: str = "cpu") -> str:
    """The precision a server picks when none is configured: bf16 on a CPU with native bfloat16 and OpenVINO (its
    masks agree with fp32 at Dice >= 0.995 in the benchmarks), and on CUDA; exact fp32 otherwise."""
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if (openvino_available() and cpu_bf16_native()) else "fp32"


_CORE = None
_CORE_LOCK = threading.Lock()


def _core():
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino as ov

            _CORE = ov.Core()
        return _CORE


# -------------------------------------------------------------------------------------------------------------------
# backends: callables image (B, 1, D, H, W) -> embedding (B, C, gd, gh, gw) float32 on the model's device
# -------------------------------------------------------------------------------------------------------------------
class EncoderBackend:
    """Base class: ``precision`` (what runs), ``requested`` (what was asked), ``runtime``, ``reason`` (of a
    fallback), ``cache_path`` (a converted model), ``prepare_seconds`` (conversion or loading)."""

    runtime = "torch"

    def __init__(self, precision: str, requested: str, reason: str = ""):
        self.precision = precision
        self.requested = requested
        self.reason = reason
        self.cache_path: Optional[str] = None
        self.prepare_seconds = 0.0

    @property
    def tag(self) -> str:
        return f"{self.runtime}-{self.precision}" + (f"-{self.inference}" if getattr(self, "inference", "") else "")

    def describe(self) -> dict:
        out = {"precision": self.precision, "requested": self.requested, "runtime": self.runtime}
        if self.reason:
            out["fallback_reason"] = self.reason
        if self.cache_path:
            out["cache_path"] = self.cache_path
        if self.prepare_seconds:
            out["prepare_seconds"] = round(self.prepare_seconds, 2)
        return out

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TorchBackend(EncoderBackend):
    """The PyTorch encoder, optionally under autocast (CUDA bf16/fp16); the output is always float32."""

    def __init__(self, encoder, precision: str = "fp32", requested: Optional[str] = None, reason: str = ""):
        super().__init__(precision, requested or precision, reason)
        self.encoder = encoder
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast(self, device_type: str):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        weight = self.encoder.norm.weight
        image = image.to(weight.device, weight.dtype)
        with self.autocast(weight.device.type):
            return self.encoder(image).float()


class OpenVINOBackend(EncoderBackend):
    """A converted encoder compiled for the CPU; one infer request per call (calls are serialised by a lock)."""

    runtime = "openvino"

    def __init__(self, xml_path: str, shape: Sequence[int], precision: str, requested: str, inference: str,
                 threads: int = 0):
        super().__init__(precision, requested)
        self.cache_path = xml_path
        self.shape = tuple(int(s) for s in shape)
        self.inference = inference  # "bf16" / "f32": the plugin's inference precision for non-int8 ops
        core = _core()
        config = {"INFERENCE_PRECISION_HINT": inference, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(xml_path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image.detach().to("cpu", torch.float32)
        if tuple(image.shape[1:]) != self.shape[1:]:
            raise ValueError(f"image must be (B, {', '.join(map(str, self.shape[1:]))}), got {tuple(image.shape)}")
        outputs = []
        with self._lock:
            for item in image.split(1):  # converted for batch 1: on CPU a batch costs the same per item
                result = self.request.infer({0: np.ascontiguousarray(item.numpy())}, share_inputs=False)
                outputs.append(torch.from_numpy(np.array(result[0], dtype=np.float32, copy=True)))
        return torch.cat(outputs)


# -------------------------------------------------------------------------------------------------------------------
# conversion and cache
# -------------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "segvol")
    return os.path.join(base, "openvino")


def weights_hash(encoder: torch.nn.Module) -> str:
    """Hash of the encoder's tensors (names, shapes, values): the same weights give the same converted model."""
    digest = hashlib.blake2b(digest_size=10)
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def calibration_hash(views: Sequence[np.ndarray]) -> str:
    digest = hashlib.blake2b(digest_size=6)
    for view in views:
        digest.update(np.ascontiguousarray(view, dtype=np.float32).tobytes())
    return digest.hexdigest()


def cache_name(whash: str, precision: str, shape: Sequence[int], calibration: str = "") -> str:
    dims = "x".join(str(int(s)) for s in shape)
    extra = f"-cal{calibration}" if calibration else ""
    return f"encoder-{whash}-{precision}{extra}-{dims}-ov{openvino_available()}"


class _EncoderForExport(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image):
        return self.encoder(image)


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies int8 with 32-bit accumulation (AVX-512 VNNI or AVX-VNNI), by ``cpu_flags``."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def _int8_kind() -> str:
    """The kind of int8 encoder this CPU gets, which names its cached IR and chooses its quantization parameters
    (``_int8_parameters``): "int8" with VNNI, else "int8-overflowfix"."""
    return "int8" if cpu_has_vnni() else "int8-overflowfix"


def _int8_parameters():
    """NNCF's advanced parameters for our int8 encoder. Without VNNI, int8 products go through 16-bit sums that
    saturate: NNCF's overflow fix (weights on 7 bits) then applies to every layer instead of the first only (measured on
    an AVX2-only EPYC: 0.947 of the labels agreed with fp32 without it)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    return AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.FIRST_LAYER if _int8_kind() == "int8" else OverflowFix.ENABLE)


def convert_encoder(encoder: torch.nn.Module, shape: Sequence[int], path_xml: str,
                    calibration: Optional[Sequence[np.ndarray]] = None) -> str:
    """Convert (and for int8 quantize) ``encoder`` to an OpenVINO IR at ``path_xml`` (atomically)."""
    import openvino as ov

    folder = os.path.dirname(path_xml)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(path_xml)[:-4]
    started = time.perf_counter()
    logger.warning("converting the image encoder to OpenVINO (%s, input %s) into %s: once per checkpoint and "
                   "precision, about 10-40 s%s", "int8" if calibration is not None else "float",
                   "x".join(map(str, shape)), folder, ", plus int8 calibration" if calibration is not None else "")
    source = encoder
    if next(encoder.parameters()).device.type != "cpu" or next(encoder.parameters()).dtype != torch.float32:
        import copy

        source = copy.deepcopy(encoder).to("cpu", torch.float32)
    wrapper = _EncoderForExport(source).eval()
    example = torch.zeros(tuple(int(s) for s in shape))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer notes: nothing to act on
        model = ov.convert_model(wrapper, example_input=example, input=[tuple(int(s) for s in shape)])
    logger.warning("  traced and converted in %.1f s", time.perf_counter() - started)
    if calibration is not None:
        import nncf

        views = [np.ascontiguousarray(v, dtype=np.float32).reshape(shape) for v in calibration]
        tick = time.perf_counter()
        logger.warning("  int8 post-training quantization (NNCF) on %d calibration views", len(views))
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is for results (JSON lines)
            model = nncf.quantize(model, nncf.Dataset(views), subset_size=len(views),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                                  advanced_parameters=_int8_parameters())
        logger.warning("  quantized in %.1f s", time.perf_counter() - tick)
    tmp = tempfile.mkdtemp(prefix=f".{stem}.", dir=folder)
    try:
        ov.save_model(model, os.path.join(tmp, stem + ".xml"), compress_to_fp16=False)
        # .bin first: the .xml's presence is what marks a complete entry (segvol.io: fsynced, renamed, folder fsynced)
        for name, final in ((stem + ".bin", os.path.join(folder, stem + ".bin")), (stem + ".xml", path_xml)):
            fsync_file(os.path.join(tmp, name))
            replace_durably(os.path.join(tmp, name), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("  OpenVINO encoder ready in %.1f s: %s", time.perf_counter() - started, path_xml)
    return path_xml


def calibration_views(images: Iterable, image_size: Sequence[int], per_image: int = 3) -> List[np.ndarray]:
    """Calibration views for int8 from CT files or arrays: per image its zoom-out view and ``per_image - 1`` native
    windows through the body's centre (what the encoder sees in the zoom-out and zoom-in passes)."""
    from .io import read_image
    from .preprocess import preprocess

    views = []
    for image in images:
        volume = read_image(image) if isinstance(image, (str, os.PathLike)) else image
        prepared = preprocess(volume.array, volume.affine, tuple(image_size))
        views.append(np.asarray(prepared.zoom_out, dtype=np.float32).reshape(1, 1, *image_size))
        native = np.asarray(prepared.native, dtype=np.float32)
        size = np.asarray(image_size)
        for k in range(per_image - 1):
            centre = np.asarray(native.shape) * (k + 1) / per_image
            start = np.clip(np.round(centre - size / 2).astype(int), 0, np.maximum(np.asarray(native.shape) - size, 0))
            crop = native[tuple(slice(s, s + n) for s, n in zip(start, size))]
            pad = [(0, int(n - c)) for n, c in zip(size, crop.shape)]
            views.append(np.pad(crop, pad, constant_values=float(native.min())).reshape(1, 1, *image_size))
    return views


# -------------------------------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------------------------------
def build_backend(model, precision: Optional[str] = "fp32", cache_dir: Optional[str] = None,
                  calibration: Optional[Sequence[np.ndarray]] = None, threads: Optional[int] = None,
                  runtime: Optional[str] = None) -> EncoderBackend:
    """The encoder backend for ``model`` at ``precision`` on the model's device (with fallbacks, see module doc).

    ``runtime`` forces one for comparisons: ``"torch"`` (e.g. bf16 autocast on a CPU) or ``"openvino"`` (e.g. fp32
    through OpenVINO); None picks the fast one (torch for fp32 and on CUDA, OpenVINO for bf16/int8 on CPU)."""
    requested = check_precision(precision)
    encoder = model.image_encoder
    device = model.device
    if runtime not in (None, "torch", "openvino"):
        raise PrecisionError(f"unknown runtime {runtime!r}: expected torch or openvino")
    if runtime == "torch" and requested != "int8":
        return TorchBackend(encoder, requested)
    if requested == "fp32" and runtime != "openvino":
        return TorchBackend(encoder, "fp32")
    if device.type == "cuda":
        if requested == "int8":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return _fallback(encoder, requested, f"int8 runs on CPU (OpenVINO) only; CUDA uses {dtype} autocast",
                             dtype)
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            return _fallback(encoder, requested, "this GPU has no bfloat16: float16 autocast", "fp16")
        return TorchBackend(encoder, requested)
    if device.type != "cpu":
        return _fallback(encoder, requested, f"no fast path on device {device.type}")
    if requested == "fp16":
        return _fallback(encoder, requested, "fp16 is a CUDA precision")
    version = openvino_available()
    if version is None:
        return _fallback(encoder, requested, "OpenVINO is not installed or not importable (pip install -r "
                                             "requirements.txt)")
    bf16 = cpu_bf16_native()
    if requested == "bf16" and not bf16:
        return _fallback(encoder, requested, "this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag)")
    if requested == "int8" and not calibration:
        raise PrecisionError("int8 needs calibration: a few CT files, or views from "
                             "segvol.accel.calibration_views(ct_files, image_size)")
    if requested == "int8" and isinstance(calibration[0], (str, os.PathLike)):
        calibration = calibration_views(calibration, model.config.image_size, per_image=2)
    shape = (1, 1, *model.config.image_size)
    whash = weights_hash(encoder)
    cal = calibration_hash(calibration) if requested == "int8" else ""
    folder = cache_dir or default_cache_dir()
    # one float IR serves fp32 and bf16 (bf16 is the plugin's inference precision); int8 has its own, quantized for
    # this CPU's kind of int8 arithmetic (``_int8_parameters``)
    kind = _int8_kind() if requested == "int8" else "float"
    xml = os.path.join(folder, cache_name(whash, kind, shape, cal) + ".xml")
    started = time.perf_counter()
    if not (os.path.isfile(xml) and os.path.isfile(xml[:-4] + ".bin")):
        convert_encoder(encoder, shape, xml, calibration if requested == "int8" else None)
    else:
        logger.info("OpenVINO encoder from cache %s", xml)
    inference = "bf16" if (bf16 and requested != "fp32") else "f32"
    threads = torch.get_num_threads() if threads is None else threads
    backend = OpenVINOBackend(xml, shape, requested, requested, inference, threads)
    backend.prepare_seconds = time.perf_counter() - started
    return backend


def _fallback(encoder, requested: str, reason: str, precision: str = "fp32") -> TorchBackend:
    logger.warning("precision %s unavailable: %s; the image encoder runs in %s", requested, reason,
                   "exact float32" if precision == "fp32" else precision)
    return TorchBackend(encoder, precision, requested, reason)


def accelerate(model, precision: Optional[str] = "fp32", **kwargs) -> EncoderBackend:
    """Attach the encoder backend for ``precision`` to ``model`` (``model.encoder_backend``) and return it.
    ``fp32`` detaches any backend: ``encode_image`` is then the exact PyTorch encoder again."""
    backend = build_backend(model, precision, **kwargs)
    model.encoder_backend = None if (backend.precision == "fp32" and backend.runtime == "torch") else backend
    model.precision_info = backend.describe()
    return backend
