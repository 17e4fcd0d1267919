"""Category vocabulary: training names, client spellings, unknown names."""
from __future__ import annotations

import json

import pytest

from segvol.errors import SegVolInputError
from segvol.vocabulary import Vocabulary, normalise


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary.load()


def test_covers_the_segvol_training_categories(vocabulary):
    labels = vocabulary.labels()
    assert len(labels) > 200
    assert sorted(labels.values()) == list(range(1, len(labels) + 1))
    for name in ("liver", "kidney left", "left kidney", "portal vein and splenic vein", "vertebrae T12", "brainstem",
                 "parotid gland right", "lung tumours", "additional 13th thoracic vertebra, T13"):
        assert labels[name] >= 1  # each training string is served as is


@pytest.mark.parametrize("spelling, expected", [
    ("kidney_left", "kidney left"), ("Kidney Left", "kidney left"), ("LeftKidney", "left kidney"),
    ("left kidney", "left kidney"), ("KIDNEY-LEFT", "kidney left"), ("vertebrae_L1", "vertebrae L1"),
    ("thyroid_gland", "thyroid"), ("Mandible", "bone mandible"), ("SpinalCord", "spinal cord"),
    ("RightParotid", "parotid gland right"), ("IVC", "inferior vena cava"), ("lung_upper_lobe_left", "lung upper lobe left"),
    ("urinary_bladder", "urinary bladder"), ("Brainstem", "brainstem"),
])
def test_client_spellings_resolve_to_training_text(vocabulary, spelling, expected):
    assert vocabulary.resolve(spelling) == expected


def test_normalise_moves_the_side_to_the_end():
    assert normalise("Left_Adrenal-Gland") == normalise("adrenal gland left") == "adrenal gland left"


def test_totalsegmentator_names_mostly_resolve(vocabulary, tmp_path):
    from conftest import DATA, require

    labels = json.loads(require(DATA / "totalseg-example" / "labels.json", "TotalSegmentator labels").read_text())
    names = list(labels.values())
    known = [n for n in names if n in vocabulary]
    assert len(known) >= 60, sorted(set(names) - set(known))


def test_unknown_name_is_a_clear_error_with_suggestions(vocabulary):
    with pytest.raises(SegVolInputError, match=r"unknown label 'kidny left'.*closest known names: 'kidney left'"):
        vocabulary.resolve("kidny left")
    assert vocabulary.resolve("kidny left", allow_free_text=True) == "kidny left"
    with pytest.raises(SegVolInputError):
        vocabulary.resolve("   ", allow_free_text=True)
    with pytest.raises(SegVolInputError, match="not in the vocabulary"):
        vocabulary.by_index(10_000)


def test_learned_names_extend_with_new_indices(vocabulary):
    extended = Vocabulary(list(vocabulary.categories))
    added = extended.extend(["PTV70", "liver", "Kidney_Left"])
    assert added == ["PTV70"]
    assert extended.labels()["PTV70"] == len(vocabulary) + 1 and extended.resolve("ptv70") == "PTV70"


def test_custom_vocabulary_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(["tumour", {"name": "GTV", "synonyms": ["gross tumour volume"]}]))
    custom = Vocabulary.load(str(path))
    assert custom.labels() == {"tumour": 1, "GTV": 2}
    assert custom.resolve("Gross Tumour Volume") == "GTV"
