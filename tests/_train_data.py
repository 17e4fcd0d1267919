"""Tiny synthetic CT datasets for the training tests: a body with a bright and a dark ball, labelled by name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import nibabel as nib
import numpy as np

from segvol.config import SegVolConfig

# Smaller than SMALL: a 16x32x32 window, 64 image tokens, one transformer layer everywhere.
TINY = SegVolConfig(image_size=(16, 32, 32), patch_size=(4, 8, 8), hidden_size=32, num_layers=1, num_heads=2,
                    mlp_dim=64, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=16,
                    text_hidden_size=32, text_intermediate_size=64, text_num_layers=1, text_num_heads=2)

LPS = np.diag([-1.5, -1.5, 2.0, 1.0])  # a non-RAS affine: training must follow the app's orientation handling


def make_volume(rng: np.random.Generator, shape=(40, 40, 24)):
    """(image int16, label uint8): air, a body cylinder, label 1 a bright ball, label 2 a dark ball."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = np.full(shape, -1000.0)
    body = (x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 < (0.42 * shape[0]) ** 2
    image[body] = 40.0 + rng.normal(0, 15, size=int(body.sum()))
    label = np.zeros(shape, np.uint8)
    centres = []
    for value, intensity in ((1, 400.0), (2, -300.0)):
        for _ in range(100):
            radius = rng.uniform(3.0, 5.0)
            centre = np.array([rng.uniform(12, shape[0] - 12), rng.uniform(12, shape[1] - 12),
                               rng.uniform(5, shape[2] - 5)])
            if all(np.linalg.norm(centre - c) > 11 for c in centres):
                break
        centres.append(centre)
        ball = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((z - centre[2]) * 1.3) ** 2) < radius ** 2
        image[ball] = intensity + rng.normal(0, 15, size=int(ball.sum()))
        label[ball] = value
    return image.astype(np.int16), label


def write_dataset(folder: Path, count: int, names: Dict[int, str], seed: int = 0,
                  start: int = 0, affine: np.ndarray = LPS, pseudo: bool = False) -> Path:
    """An openkbp-style folder: ``dataset.json`` + ``case_N_ct.nii.gz`` / ``case_N_seg.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for number in range(start, start + count):
        image, label = make_volume(rng)
        case = f"case_{number}"
        nib.save(nib.Nifti1Image(image, affine), folder / f"{case}_ct.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"{case}_seg.nii.gz")
        if pseudo:
            (folder / "fh").mkdir(exist_ok=True)
            regions = np.where(image > 200, 1001, np.where(image > -500, 1002, 0)).astype(np.int32)
            nib.save(nib.Nifti1Image(regions, affine), folder / "fh" / f"{case}.nii.gz")
        cases.append({"patient": case})
    spec = {"labels": {str(k): v for k, v in names.items()}, "image_file_suffix": "_ct.nii.gz",
            "label_file_suffix": "_seg.nii.gz", "cases": cases}
    (folder / "dataset.json").write_text(json.dumps(spec))
    return folder


def write_datastore(folder: Path, count: int, seed: int = 0, names: Optional[Sequence[str]] = None) -> Path:
    """A MONAI Label local datastore folder: images at the top, final labels under labels/final."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        image, label = make_volume(rng)
        nib.save(nib.Nifti1Image(image, LPS), folder / f"img_{number}.nii.gz")
        if names is not None:
            nib.save(nib.Nifti1Image(label, LPS), folder / "labels" / "final" / f"img_{number}.nii.gz")
    return folder


def write_unlabelled(folder: Path, labels: Path, count: int, seed: int) -> None:
    """``img_N.nii.gz`` images in ``folder`` (a datastore without labels yet) and their labels in ``labels``, for a test
    to save through the server."""
    rng = np.random.default_rng(seed)
    for number in range(count):
        image, label = make_volume(rng)
        nib.save(nib.Nifti1Image(image, LPS), folder / f"img_{number}.nii.gz")
        nib.save(nib.Nifti1Image(label, LPS), labels / f"img_{number}.nii.gz")
