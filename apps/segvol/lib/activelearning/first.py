"""``first``: the first unlabelled image by id (MONAI Label's stock strategy name; deterministic, for scripted
passes)."""
from __future__ import annotations

from monailabel.interfaces.tasks.strategy import Strategy


class FirstStrategy(Strategy):
    def __init__(self):
        super().__init__("First unlabelled image by id (deterministic)")

    def __call__(self, request, datastore):
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        return {"id": images[0]} if images else None
