"""The fast image-encoder path (segvol.accel) on the small configuration, CPU.

Tolerances (stated here, measured on the random-weight SMALL model and the synthetic CT of _engine_fixtures):
OpenVINO float32: embedding within 1e-4 of PyTorch, label maps agree on >= 99.9 % of voxels; int8: label maps agree
on >= 97 % of voxels (int8 noise moves the 0.5-probability boundary of a random network by a voxel here and there);
bf16 (only on CPUs with native bfloat16): >= 99 %. Fallbacks must give exactly the fp32 result.
"""
from __future__ import annotations

import builtins
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segvol
from segvol import accel
from segvol.engine import SegVolEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_fixtures import OracleModel, synthetic_ct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"


def _model(seed: int = 0):
    if not TOKENIZER.exists():
        pytest.skip(f"{TOKENIZER} is missing (tests read it from ../shared beside the repository)")
    torch.manual_seed(seed)
    model = segvol.SegVol(segvol.SMALL, segvol.modeling.text_encoder.load_tokenizer(str(TOKENIZER)),
                          checkpoint_id=f"small-{seed}").eval()
    with torch.no_grad():  # a random network whose logits are not all near 0: a real boundary to compare
        model.mask_decoder.output_hypernetworks_mlps.apply(lambda m: m.weight.mul_(4) if hasattr(m, "weight") else None)
    return model


@pytest.fixture(scope="module")
def ct():
    array, affine, _ = synthetic_ct()
    return array, affine


@pytest.fixture(scope="module")
def fp32_result(ct):
    model = _model()
    return SegVolEngine(model).segment(ct[0], texts=["liver", "spleen"], box=[20, 20, 10, 60, 60, 40], affine=ct[1])


def _need_openvino():
    if accel.openvino_available() is None:
        pytest.skip("openvino is not installed (pip install -r requirements.txt)")


def _agreement(a, b) -> float:
    return float((a == b).mean())


def _segment(model, ct):
    return SegVolEngine(model).segment(ct[0], texts=["liver", "spleen"], box=[20, 20, 10, 60, 60, 40], affine=ct[1])


def test_default_is_exact_fp32():
    model = _model()
    assert model.encoder_backend is None
    backend = accel.accelerate(model, "fp32")
    assert backend.precision == "fp32" and backend.runtime == "torch" and model.encoder_backend is None
    with pytest.raises(accel.PrecisionError):
        accel.accelerate(model, "fp8")
    assert accel.check_precision("bfloat16") == "bf16"


def test_openvino_fp32_matches_torch(tmp_path, ct, fp32_result, caplog):
    _need_openvino()
    model = _model()
    image = torch.rand(2, 1, *segvol.SMALL.image_size)
    with torch.inference_mode():
        expected = model.encode_image(image)
    with caplog.at_level(logging.WARNING, logger="segvol.accel"):
        backend = accel.accelerate(model, "fp32", runtime="openvino", cache_dir=str(tmp_path))
    assert any("converting the image encoder" in r.getMessage() for r in caplog.records)
    assert backend.runtime == "openvino" and model.encoder_backend is backend
    assert os.path.isfile(backend.cache_path) and os.path.isfile(backend.cache_path[:-4] + ".bin")
    with torch.inference_mode():
        got = model.encode_image(image)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-4
    result = _segment(model, ct)
    assert result.labels == fp32_result.labels
    assert _agreement(result.label, fp32_result.label) >= 0.999
    # no temp folders left in the cache, only the converted model
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".bin", ".xml"]


def test_converted_model_cached_per_weights(tmp_path, caplog):
    _need_openvino()
    model = _model()
    first = accel.accelerate(model, "fp32", runtime="openvino", cache_dir=str(tmp_path))
    stamp = os.stat(first.cache_path).st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segvol.accel"):
        again = accel.accelerate(_model(), "fp32", runtime="openvino", cache_dir=str(tmp_path))
    assert again.cache_path == first.cache_path and os.stat(again.cache_path).st_mtime_ns == stamp
    assert not any("converting" in r.getMessage() for r in caplog.records)  # loaded, not converted
    tuned = _model()
    with torch.no_grad():
        tuned.image_encoder.blocks[0].mlp.linear1.weight.add_(1e-3)  # a "fine-tuned" encoder
    other = accel.accelerate(tuned, "fp32", runtime="openvino", cache_dir=str(tmp_path))
    assert other.cache_path != first.cache_path
    assert accel.weights_hash(tuned.image_encoder) in os.path.basename(other.cache_path)


def test_int8_same_label_within_tolerance(tmp_path, ct, fp32_result):
    _need_openvino()
    pytest.importorskip("nncf")
    model = _model()
    views = accel.calibration_views([_volume(ct)], segvol.SMALL.image_size, per_image=3)
    assert len(views) == 3 and views[0].shape == (1, 1, *segvol.SMALL.image_size)
    with pytest.raises(accel.PrecisionError):
        accel.accelerate(model, "int8", cache_dir=str(tmp_path))  # int8 without calibration is refused
    backend = accel.accelerate(model, "int8", cache_dir=str(tmp_path), calibration=views)
    assert backend.precision == "int8" and backend.runtime == "openvino" and "int8" in backend.cache_path
    result = _segment(model, ct)
    assert result.labels == fp32_result.labels
    assert _agreement(result.label, fp32_result.label) >= 0.97


def test_bf16_same_label_or_clean_fallback(tmp_path, ct, fp32_result, caplog):
    _need_openvino()
    model = _model()
    with caplog.at_level(logging.WARNING, logger="segvol.accel"):
        backend = accel.accelerate(model, "bf16", cache_dir=str(tmp_path))
    if not accel.cpu_bf16_native():
        # this CPU (e.g. the 2-core Ice Lake CI machine) has no avx512_bf16/AMX: exact fp32 and one log line
        assert backend.precision == "fp32" and backend.requested == "bf16" and "bfloat16" in backend.reason
        assert model.encoder_backend is None
        assert any("precision bf16 unavailable" in r.getMessage() for r in caplog.records)
        result = _segment(model, ct)
        assert np.array_equal(result.label, fp32_result.label)
        pytest.skip("this CPU has no native bfloat16: the bf16 fast path fell back to fp32 (checked above)")
    assert backend.precision == "bf16" and backend.inference == "bf16"
    result = _segment(model, ct)
    assert _agreement(result.label, fp32_result.label) >= 0.99


def test_fallback_when_openvino_is_missing(monkeypatch, ct, fp32_result, caplog):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino' (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    accel.openvino_available.cache_clear()
    monkeypatch.setattr(accel, "cpu_bf16_native", lambda: True)  # even on a bf16 CPU
    try:
        model = _model()
        for precision in ("bf16", "int8"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="segvol.accel"):
                backend = accel.accelerate(model, precision)
            assert backend.precision == "fp32" and backend.requested == precision
            assert "OpenVINO is not installed" in backend.reason and model.encoder_backend is None
            assert any(f"precision {precision} unavailable" in r.getMessage() for r in caplog.records)
        engine = SegVolEngine(model)
        assert engine.precision == "fp32"
        result = engine.segment(ct[0], texts=["liver", "spleen"], box=[20, 20, 10, 60, 60, 40], affine=ct[1])
        assert np.array_equal(result.label, fp32_result.label)  # exactly the fp32 result
    finally:
        monkeypatch.undo()
        accel.openvino_available.cache_clear()


def test_cuda_precisions_fall_back_on_cpu():
    model = _model()
    backend = accel.accelerate(model, "fp16")  # a CUDA precision
    assert backend.precision == "fp32" and "CUDA" in backend.reason
    # the CUDA path's backend (autocast encoder, float32 output) is the same code on CPU with runtime="torch"
    image = torch.rand(1, 1, *segvol.SMALL.image_size)
    with torch.inference_mode():
        expected = model.encode_image(image)
        backend = accel.accelerate(model, "bf16", runtime="torch")
        got = model.encode_image(image)
    assert backend.runtime == "torch" and backend.precision == "bf16"
    assert got.dtype == torch.float32 and float((got - expected).abs().max()) < 0.1
    model.train()  # training never goes through a backend
    assert model.encode_image(image).requires_grad
    model.eval()
    accel.accelerate(model, "fp32")
    assert model.encoder_backend is None


def test_engine_batched_window_encoding_matches():
    """encode_batch > 1 (the CUDA default) encodes the zoom-in windows in batches: same windows, same result."""
    array, affine, truth = synthetic_ct(shape=(150, 140, 80))  # several zoom-in windows of the SMALL model
    probe = OracleModel()
    prepared, _ = SegVolEngine(probe).prepare(array, affine)
    frames = prepared.frames  # the oracle's intensity per object, as tests/test_engine.py sets it
    values = {name: float(np.median(prepared.native[frames.axis_map.to_model(mask)[frames.crop.slices]]))
              for name, mask in truth.items()}
    one = OracleModel(values=values)
    batched = OracleModel(values=values)
    first = SegVolEngine(one, encode_batch=1).segment(array, texts=["sphere", "cube"], affine=affine,
                                                      box=[10, 10, 5, 140, 130, 75])
    engine = SegVolEngine(batched, encode_batch=4)
    second = engine.segment(array, texts=["sphere", "cube"], affine=affine, box=[10, 10, 5, 140, 130, 75])
    assert engine.encode_batch == 4
    assert first.stats["encoder_forwards"] == second.stats["encoder_forwards"] > 2
    assert np.array_equal(first.label, second.label)
    batches = [e["image"].shape[0] for e in batched.encoded]
    assert max(batches) > 1 and sum(batches) == len(one.encoded)
    again = engine.segment(array, texts=["sphere", "cube"], affine=affine, box=[10, 10, 5, 140, 130, 75],
                           points=[(30, 40, 18, 1)])
    assert again.stats["encoder_forwards"] == 0  # cached embeddings are reused


def _volume(ct):
    from segvol.io import Volume

    array, affine = ct
    return Volume(array=array, affine=affine, header=None, source=None)


def test_int8_overflow_fix_follows_the_cpus_int8_arithmetic(monkeypatch):
    """Without VNNI (16-bit int8 sums that saturate) every layer gets NNCF's overflow fix; with VNNI only the first
    layer (NNCF's default)."""
    pytest.importorskip("nncf")
    from nncf.quantization.advanced_parameters import OverflowFix

    for vnni, fix in ((True, OverflowFix.FIRST_LAYER), (False, OverflowFix.ENABLE)):
        monkeypatch.setattr(accel, "cpu_has_vnni", lambda vnni=vnni: vnni)
        assert accel._int8_parameters().overflow_fix == fix
