"""SegVol Label: the MONAI Label app serving SegVol.

MONAI Label rebuilds this app in every train and scoring subprocess, so nothing heavy happens in the constructor:
the network is loaded on first use.
"""
from __future__ import annotations

import logging
import os
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.dirname(os.path.dirname(APP_DIR))
DEFAULT_MODELS_DIR = os.path.join(PROJECT_DIR, "models")


class SegVolApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.weights = conf.get("weights", DEFAULT_MODELS_DIR)
        self.tokenizer = conf.get("tokenizer", "")
        self.device = conf.get("device", "auto")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SegVol Label",
            description="Universal volumetric CT segmentation with text, point and box prompts (SegVol)",
            version="0.1.0",
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {}
