"""Test doubles for the engine: a synthetic CT with known objects and an "oracle" network with SegVol's interface.

The oracle segments what its prompts say, exactly and transparently, so that the engine's geometry (frames, ROI,
windows, prompt mapping, blending, mapping back) can be checked voxel by voxel:

* its image embedding is the input image resampled to the decoder's low-res grid (so decoding sees the content);
* a text selects voxels whose intensity is near that category's value (``OracleModel.values``);
* a box keeps only voxels inside it; positive points add a ball, negative points remove one;
* logits are +8 inside the selection and -8 outside, at low resolution, then upsampled like SegVol.

Every encode and every decoded prompt set is recorded with the encoding's serial number, so tests can see which
window got which prompt.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import segvol
from segvol.modeling.mask_decoder import ImageTokens
from segvol.modeling.prompt_encoder import PromptEncoder

BALL_RADIUS = 4.0  # window voxels


class OracleModel(nn.Module):
    def __init__(self, config=segvol.SMALL, values: Optional[Dict[str, float]] = None, tolerance: float = 0.04):
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.values = dict(values or {})
        self.tolerance = tolerance
        self.names: List[str] = []
        self.encoded: List[dict] = []
        self.decoded: List[dict] = []
        self.checkpoint_id = "oracle"

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def encode_text(self, names):
        rows = []
        for name in names:
            if name not in self.names:
                self.names.append(name)
            rows.append([float(self.names.index(name))])
        return torch.tensor(rows)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """-> (B, 2, *low_res): channel 0 the image at low resolution, channel 1 a serial number identifying the
        encoding (it survives the engine batching several windows' embeddings together)."""
        low = F.interpolate(image.float(), size=self.config.low_res_size, mode="area")
        serial = len(self.encoded)
        self.encoded.append({"id": serial, "image": image.detach().clone()})
        return torch.cat([low, torch.full_like(low, float(serial))], dim=1)

    def image_tokens(self, embedding: torch.Tensor) -> ImageTokens:
        """The embedding itself stands for every part (``decode`` reads ``tokens``)."""
        return ImageTokens(embedding, embedding, embedding, embedding, embedding, tuple(embedding.shape[2:]))

    def decode(self, image_embedding, text_embedding=None, boxes=None, points=None, previous=None) -> torch.Tensor:
        assert previous is None, "the oracle's configuration takes no previous-prediction prompt"
        if isinstance(image_embedding, ImageTokens):
            image_embedding = image_embedding.tokens
        sizes = [t.shape[0] for t in (text_embedding, boxes) if t is not None]
        if points is not None:
            sizes.append(points[0].shape[0])
        batch = max(sizes + [image_embedding.shape[0]])
        low = self.config.low_res_size
        scale = torch.tensor(self.config.image_size, dtype=torch.float32) / torch.tensor(low, dtype=torch.float32)
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in low], indexing="ij")
        coords = torch.stack([(g + 0.5) * s - 0.5 for g, s in zip(grids, scale)], dim=-1)  # window voxel coords
        out = []
        for b in range(batch):
            embedding = image_embedding[min(b, image_embedding.shape[0] - 1)]
            image = embedding[0]
            box = None if boxes is None else boxes.reshape(batch, 6)[b]
            if points is not None:  # absent slots (a shorter point list batched with longer ones) are no points
                present = points[1][b] != PromptEncoder.ABSENT
                points_b = (points[0][b][present], points[1][b][present])
            self.decoded.append({
                "id": int(embedding[1].flatten()[0]),
                "name": None if text_embedding is None else self.names[int(text_embedding[b, 0])],
                "box": None if box is None else box.clone().numpy(),
                "points": None if points is None else (points_b[0].clone().numpy(), points_b[1].clone().numpy()),
            })
            region = torch.ones(low, dtype=torch.bool)
            if text_embedding is not None:
                value = self.values[self.names[int(text_embedding[b, 0])]]
                region &= (image - value).abs() < self.tolerance
            if box is not None:
                region &= ((coords >= box[:3] - 0.5) & (coords <= box[3:] + 0.5)).all(-1)
            if points is not None:
                balls = [((coords - p).norm(dim=-1) <= BALL_RADIUS, int(l)) for p, l in zip(*points_b)]
                if text_embedding is None and boxes is None:
                    region = torch.zeros(low, dtype=torch.bool)
                for ball, label in balls:
                    region = region | ball if label == 1 else region & ~ball
            out.append(torch.where(region, 8.0, -8.0))
        return torch.stack(out)[:, None]

    def upsample(self, low_res):
        return F.interpolate(low_res, size=self.config.image_size, mode="trilinear", align_corners=False)

    def decodes_for(self, serial: int) -> List[dict]:
        """The prompt sets decoded against encoding ``serial`` (one record per prompt set)."""
        return [d for d in self.decoded if d["id"] == serial]

    def reset(self):
        self.encoded.clear()
        self.decoded.clear()


def synthetic_ct(shape=(90, 80, 50)):
    """A CT-like array (stored X, Y, Z) with air, an elliptic body, a bright sphere and a dense cube.

    Returns (array int16, RAS affine with anisotropic voxels, {"sphere": mask, "cube": mask}).
    """
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    centre = (np.asarray(shape) - 1) / 2
    body = (((grid - centre) / (np.asarray(shape) * [0.45, 0.42, 0.6])) ** 2).sum(-1) <= 1
    sphere = np.linalg.norm((grid - [30, 40, 18]) * [1.0, 1.0, 3.0], axis=-1) <= 9
    cube = np.zeros(shape, bool)
    cube[58:70, 30:44, 30:42] = True
    array = np.full(shape, -1000, np.int16)
    # soft tissue with texture: a uniform body would clip to the same value as air (the reference's percentiles)
    noise = np.random.default_rng(0).integers(-100, 101, size=shape).astype(np.int16)
    array[body] = noise[body]
    array[sphere & body] = 300
    array[cube & body] = 1000
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-30.0, -20.0, 100.0]
    return array, affine, {"sphere": sphere & body, "cube": cube & body}


def flip_lps(array, affine):
    """The same anatomy stored as LPS: axes 0 and 1 reversed, affine adjusted."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(array.shape[:2]) - 1
    return np.ascontiguousarray(array[::-1, ::-1, :]), affine @ flip


def permute(array, affine, axes=(2, 0, 1)):
    """The same anatomy with its stored axes permuted, affine adjusted."""
    return np.ascontiguousarray(np.transpose(array, axes)), affine @ np.eye(4)[:, list(axes) + [3]]


def to_ras(label, affine):
    """A label array on any stored orientation -> RAS-ordered (for comparing storages voxel by voxel)."""
    import nibabel as nib

    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(label, affine)).dataobj)


def map_index(points, affine_from, affine_to):
    """Voxel indices of one storage -> the same voxels' indices in another storage of the same anatomy."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.c_[points, np.ones(len(points))]
    return (np.linalg.inv(affine_to) @ affine_from @ homogeneous.T).T[:, :3].round(6)


def map_box(box, affine_from, affine_to):
    corners = map_index(np.asarray(box).reshape(2, 3), affine_from, affine_to)
    return [int(v) for v in np.concatenate([corners.min(0), corners.max(0)])]


def run_cli(argv):
    """``scripts/segment.py`` run in this process with ``argv`` -> (exit status, its JSON lines)."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        import segment
    finally:
        sys.path.remove(scripts)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = segment.main(argv)
    return status, [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
