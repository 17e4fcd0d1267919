"""The SegVol network: image encoder + prompt encoder + mask decoder + text encoder."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SegVolConfig
from .image_encoder import ImageEncoder
from .mask_decoder import ImageTokens, MaskDecoder
from .prompt_encoder import PromptEncoder
from .text_encoder import TextEncoder

Points = Tuple[torch.Tensor, torch.Tensor]


class SegVol(nn.Module):
    """Promptable volumetric segmentation of one ``config.image_size`` window (32x256x256 officially).

    Coordinates of points and boxes are (d, h, w) voxel indices of that window; the image is (B, 1, D, H, W) in [0, 1]
    (see ``segvol.preprocess``). ``forward`` returns full-resolution logits; ``encode_image`` and ``decode`` split the
    work so an image embedding can be reused for many prompts.
    """

    def __init__(self, config: SegVolConfig = SegVolConfig(), tokenizer=None, checkpoint_id: Optional[str] = None,
                 vocabulary: Sequence[str] = ()):
        """``tokenizer``: the CLIP tokenizer text prompts need (``text_encoder.load_tokenizer``); ``checkpoint_id``:
        what the engine's caches key this model's results by (``segvol.load_model`` gives the file's); ``vocabulary``:
        the category names a project checkpoint was trained on."""
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.prompt_encoder = PromptEncoder(config)
        self.mask_decoder = MaskDecoder(config)
        self.text_encoder = TextEncoder(config, tokenizer)
        self.checkpoint_id = checkpoint_id
        self.vocabulary = list(vocabulary)
        self.encoder_backend = None  # segvol.accel: a fast encoder (OpenVINO, autocast) used in eval mode

    @property
    def device(self) -> torch.device:
        return self.image_encoder.norm.weight.device

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def encode_text(self, names: Sequence[str]) -> torch.Tensor:
        """Category names -> (N, hidden) text embeddings, cached per name."""
        return self.text_encoder.encode(names)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> image embedding (B, hidden, gd, gh, gw)."""
        if self.encoder_backend is not None and not self.training:
            return self.encoder_backend(image)
        return self.image_encoder(image.to(self.device, self.image_encoder.norm.weight.dtype))

    def image_tokens(self, image_embedding: torch.Tensor) -> ImageTokens:
        """Image embedding (B, hidden, g...) -> what the decoder computes from it before any prompt; ``decode`` takes
        it in place of the embedding (keep it to decode new prompts on the same image faster)."""
        return self.mask_decoder.image_tokens(image_embedding, self.prompt_encoder.dense_positional_encoding(),
                                              self.prompt_encoder.dense_embedding())

    def decode(
        self,
        image_embedding: Union[torch.Tensor, ImageTokens],
        text_embedding: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[Points] = None,
        previous: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Prompts against an image embedding -> low-resolution logits (B, 1, 4gd, 4gh, 4gw); (B,1,32,64,64) officially.

        ``image_embedding`` (1 or B, C, g...), or its ``image_tokens``; ``text_embedding`` (B, C); ``boxes`` (B, 6) or
        (B, 1, 6); ``points`` = (coords (B, N, 3), labels (B, N)); a set with fewer points fills its other slots with
        label ``PromptEncoder.ABSENT`` (-2), which decodes it as the set alone would. B is the number of prompt sets;
        one image embedding is shared by all of them. ``previous`` (B, 1, 4gd, 4gh, 4gw): the low-resolution logits
        the same prompts gave one interaction earlier (networks configured with ``mask_prompt`` only): with the points
        drawn as maps on the same grid, it is a dense prompt, so new clicks correct that answer where they lie.
        """
        batch = _prompt_batch_size(image_embedding, text_embedding, boxes, points)
        mask_dense = None
        if previous is not None:
            if previous.shape[0] != batch:
                raise ValueError(f"{previous.shape[0]} previous predictions for {batch} prompt sets")
            mask_dense = self.prompt_encoder.previous_mask_embedding(previous.to(self.device), points)
        if boxes is not None:
            boxes = boxes.to(self.device).reshape(batch, 1, 6)
        if points is not None:
            points = (points[0].to(self.device), points[1].to(self.device))
        if text_embedding is not None:
            text_embedding = text_embedding.to(self.device)
        sparse, dense = self.prompt_encoder(points, boxes, text_embedding, batch)
        sparse_mask = None
        if points is not None and bool((points[1] == PromptEncoder.ABSENT).any()):
            # the point slots come first in the sparse tokens (PromptEncoder.forward)
            sparse_mask = torch.ones(sparse.shape[:2], dtype=torch.bool, device=sparse.device)
            sparse_mask[:, :points[1].shape[1]] = points[1] != PromptEncoder.ABSENT
        image_pe = self.prompt_encoder.dense_positional_encoding()
        return self.mask_decoder(image_embedding, image_pe, sparse, dense, text_embedding, mask_dense, sparse_mask)

    def upsample(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits (B, C, d, h, w) -> logits on the input window, trilinear with align_corners=False.

        Where the depth is already the window's (the official 32x64x64 -> 32x256x256), the trilinear weights along
        depth are exactly 1 and 0, so a bilinear resize of each slice gives the same values for a sixth of the time
        (a click upsamples up to 17 windows); for the official window the same floats, bit for bit (tested; other
        sizes agree to float rounding).
        """
        depth, height, width = self.config.image_size
        b, c, d = low_res_logits.shape[:3]
        if d == depth:
            slices = low_res_logits.reshape(b, c * d, *low_res_logits.shape[3:])
            resized = F.interpolate(slices, size=(height, width), mode="bilinear", align_corners=False)
            return resized.reshape(b, c, depth, height, width)
        return F.interpolate(low_res_logits, size=self.config.image_size, mode="trilinear", align_corners=False)

    def forward(
        self,
        image: torch.Tensor,
        text: Optional[Sequence[str]] = None,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[Points] = None,
    ) -> torch.Tensor:
        """image (B, 1, D, H, W) in [0, 1]; text: B names; boxes (B, 6); points ((B, N, 3), (B, N)).

        Returns logits (B, 1, D, H, W); (B, 1, 32, 256, 256) for the official configuration.
        """
        if text is None and boxes is None and points is None:
            raise ValueError("SegVol needs at least one prompt: text, boxes or points")
        text_embedding = None
        if text is not None:
            names = [text] if isinstance(text, str) else list(text)
            text_embedding = self.text_encoder(names) if self.training else self.encode_text(names)
        return self.upsample(self.decode(self.encode_image(image), text_embedding, boxes, points))


def _prompt_batch_size(image_embedding, text_embedding, boxes, points) -> int:
    """Number of prompt sets B; the image embedding's batch must be B, or 1 (shared by all B)."""
    if points is not None and (points[0].dim() != 3 or points[0].shape[-1] != 3
                               or tuple(points[1].shape) != tuple(points[0].shape[:2])):
        raise ValueError("points must be (coords (B, N, 3), labels (B, N))")
    prompts = [t for t in (text_embedding, boxes, None if points is None else points[0]) if t is not None]
    sizes = {int(t.shape[0]) for t in prompts}
    if len(sizes) > 1:
        raise ValueError(f"prompt batch sizes disagree: {sorted(sizes)}")
    images = image_embedding.batch if isinstance(image_embedding, ImageTokens) else int(image_embedding.shape[0])
    batch = sizes.pop() if sizes else images
    if images not in (1, batch):
        raise ValueError(f"{images} image embeddings for {batch} prompt sets (expected 1 or {batch})")
    return batch
