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
    assert sorted(labels.values()) == list(range(1, len(labels) + 1))  # one served name per category
    training = {c.name: c.index for c in vocabulary.categories}
    for name in ("liver", "kidney left", "left kidney", "portal vein and splenic vein", "vertebrae T12", "brainstem",
                 "parotid gland right", "lung tumours", "additional 13th thoracic vertebra, T13"):
        assert training[name] >= 1 and vocabulary.resolve(name) == name  # each training string is a category


def test_served_names_are_the_vista3d_names_where_they_differ(vocabulary):
    """OHIF's Class Prompts presets match /info names exactly; the model is still prompted with the training text."""
    labels = vocabulary.labels()
    for served, training in (("vertebrae t12", "vertebrae T12"), ("left rib 1", "rib left 1"),
                             ("left lung upper lobe", "lung upper lobe left"), ("hepatic vessel", "hepatic vessels"),
                             ("liver", "liver"), ("kidney left", "kidney left"), ("left kidney", "left kidney")):
        assert vocabulary.by_index(labels[served]).name == training
        assert vocabulary.resolve(served) == training and vocabulary.served_name(training) == served
    assert "vertebrae T12" not in labels and "rib left 1" not in labels


def test_client_aliases_have_their_own_stable_indices(vocabulary):
    served = vocabulary.served_labels()
    assert served["dudenum"] == 254 and served["esphagus"] == 253
    assert vocabulary.by_index(254).name == "duodenum" and vocabulary.resolve("esphagus") == "esophagus"
    assert set(vocabulary.labels()) < set(served)  # aliases are not app-level labels (Slicer makes a segment of each)
    assert len(set(served)) <= 255  # OHIF keeps one uint8 segment per name


def test_sided_names_in_any_word_order(vocabulary):
    assert vocabulary.resolve("Left Rib 12") == vocabulary.resolve("rib_left_12") == "rib left 12"
    assert vocabulary.resolve("right iliopsoas") == "iliopsoas right"


def test_free_text_never_changes_the_vocabulary(vocabulary):
    before = vocabulary.served_labels()
    for n in range(100):
        vocabulary.resolve(f"lesion number {n}", allow_free_text=True)
    assert vocabulary.served_labels() == before
    free = vocabulary.free_values()
    assert free.start == vocabulary.max_index() + 1 and free.stop == 253  # below the client aliases
    assert not set(free) & set(before.values())


@pytest.mark.parametrize("spelling, expected", [
    ("kidney_left", "kidney left"), ("Kidney Left", "kidney left"), ("LeftKidney", "left kidney"),
    ("left kidney", "left kidney"), ("KIDNEY-LEFT", "kidney left"), ("vertebrae_L1", "vertebrae L1"),
    ("thyroid_gland", "thyroid"), ("Mandible", "bone mandible"), ("SpinalCord", "spinal cord"),
    ("RightParotid", "parotid gland right"), ("IVC", "inferior vena cava"),
    ("lung_upper_lobe_left", "lung upper lobe left"),
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
    assert extended.free_values().start == len(vocabulary) + 2


def test_custom_vocabulary_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(["tumour", {"name": "GTV", "synonyms": ["gross tumour volume"]}]))
    custom = Vocabulary.load(str(path))
    assert custom.labels() == {"tumour": 1, "GTV": 2}
    assert custom.resolve("Gross Tumour Volume") == "GTV"
