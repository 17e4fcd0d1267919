"""What a saved label's DICOM SEG says about each segment: the dcmqi segment attributes (``segmentAttribute`` of each
``label_info`` entry, which MONAI Label passes to dcmqi's ``itkimage2segimage`` unchanged) built from the entry's name,
colour and, where the segment came from a SegVol inference, its provenance: ``SegmentAlgorithmType`` SEMIAUTOMATIC,
``SegmentAlgorithmName`` ``SegVol <checkpoint id>`` (``segvol.checkpoint.checkpoint_id``: file name and hash) and a
``SegmentDescription`` holding the prompts as compact JSON (``{"model", "checkpoint", "mode", "prompts"}``). A
segment drawn by hand is MANUAL. Everything is read back from the SEG with pydicom (``SegmentSequence``) or dcmqi's
``segimage2itkimage`` (its ``meta.json``)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

ALGORITHM = "SegVol"
DESCRIPTION_LIMIT = 1024  # SegmentDescription is a DICOM ST: at most 1024 characters
NAME_LIMIT = 64  # SegmentAlgorithmName is a DICOM LO
PROMPT_KEYS = ("texts", "box", "positive_points", "negative_points", "points", "point_labels", "free_text")


def provenance_text(provenance: Dict[str, Any]) -> str:
    """The provenance as compact JSON of at most ``DESCRIPTION_LIMIT`` characters (long point lists become counts)."""
    prompts = {k: v for k, v in (provenance.get("prompts") or {}).items() if k in PROMPT_KEYS}
    payload = {"model": str(provenance.get("model_name") or "segvol"), "checkpoint": str(provenance.get("model", "")),
               "mode": str(provenance.get("mode", "")), "prompts": prompts}
    text = json.dumps(payload, separators=(",", ":"), default=str)
    if len(text) > DESCRIPTION_LIMIT:
        for key in ("positive_points", "negative_points", "points", "point_labels"):
            if isinstance(prompts.get(key), list):
                prompts[key] = f"{len(prompts[key])} items"
        text = json.dumps(payload, separators=(",", ":"), default=str)[:DESCRIPTION_LIMIT]
    return text


def segment_attribute(entry: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """dcmqi's attributes of one ``label_info`` entry (None without an ``idx``: MONAI Label's defaults then)."""
    if "idx" not in entry:
        return None
    from monailabel.datastore.utils.convert import GENERIC_ANATOMY_COLORS

    name = str(entry.get("name") or f"segment {entry['idx']}")
    rgb = [int(c) for c in list(entry.get("color") or GENERIC_ANATOMY_COLORS.get(name, (255, 0, 0)))[:3]]
    attribute: Dict[str, Any] = {
        "labelID": int(entry["idx"]),
        "SegmentLabel": name,
        "SegmentDescription": str(entry.get("description") or "Unknown"),
        "SegmentAlgorithmType": "MANUAL",
        "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": "Anatomical Structure"},
        "SegmentedPropertyTypeCodeSequence": {"CodeValue": "78961009", "CodingSchemeDesignator": "SCT",
                                              "CodeMeaning": name},
        "recommendedDisplayRGBValue": rgb,
    }
    provenance = entry.get("provenance")
    if isinstance(provenance, dict) and provenance.get("model"):
        attribute["SegmentAlgorithmType"] = "SEMIAUTOMATIC"
        attribute["SegmentAlgorithmName"] = f"{ALGORITHM} {provenance['model']}"[:NAME_LIMIT]
        attribute["SegmentDescription"] = provenance_text(provenance)
    return attribute


def with_segment_attributes(label_info: Dict[str, Any]) -> Dict[str, Any]:
    """Give every entry of the save request's ``label_info`` list that has none a dcmqi ``segmentAttribute`` (in
    place: MONAI Label adds the stored SEG's uids to the same dict); -> ``label_info``."""
    entries: List[Any] = list((label_info or {}).get("label_info") or [])
    for position, entry in enumerate(entries):
        if isinstance(entry, dict) and "segmentAttribute" not in entry:
            attribute = segment_attribute(entry)
            if attribute is not None:
                entries[position] = {**entry, "segmentAttribute": attribute}
    if entries:
        label_info["label_info"] = entries
    return label_info


__all__ = ["provenance_text", "segment_attribute", "with_segment_attributes"]
