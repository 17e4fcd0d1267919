"""Category vocabulary: the names SegVol was trained on, and every spelling clients use for them.

SegVol has no class head: any string becomes the text prompt "A computerized tomography of a {name}.". It works best
with the exact strings of its training labels, so requests are resolved to those strings. Each training name is one
category with a stable index (1..N, the order of ``data/vocabulary.json``); a name resolves by, in order:

1. the exact training string;
2. its spelling: case-folded, ``_``/``-`` and camelCase split into words (``Kidney_Left`` -> ``kidney left``);
3. its normalised form: the spelling with a leading ``left``/``right`` moved to the end (``LeftParotid`` ->
   ``parotid left``).
Steps 2 and 3 also search curated synonyms (``mandible`` -> ``bone mandible``, ``parotid left`` -> ``parotid gland
left``, TotalSegmentator names such as ``thyroid_gland``...).

Names learned by fine-tuning (``extend``) join with new indices after the built-in ones.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from .errors import BadTextError

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vocabulary.json")
_SIDES = ("left", "right")


def _words(name: str) -> List[str]:
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name.strip())  # camelCase -> camel Case
    return re.sub(r"[_\-\s,]+", " ", text.casefold()).split()


def spelling_key(name: str) -> str:
    """Case, separators and camelCase removed; word order kept (``Kidney_Left`` -> ``kidney left``)."""
    return " ".join(_words(name))


def normalise(name: str) -> str:
    """Canonical lookup key: ``spelling_key`` with a leading left/right moved to the end."""
    words = _words(name)
    if len(words) > 1 and words[0] in _SIDES:
        words = words[1:] + words[:1]
    return " ".join(words)


@dataclass
class Category:
    index: int
    name: str  # the exact text the model was trained on
    synonyms: List[str] = field(default_factory=list)
    learned: bool = False  # added by fine-tuning


class Vocabulary:
    def __init__(self, categories: Iterable[Category]):
        self.categories: List[Category] = []
        self._exact: Dict[str, Category] = {}
        self._spellings: Dict[str, Category] = {}  # word order kept: prefers "kidney left" for "kidney_left"
        self._aliases: Dict[str, Category] = {}
        for category in categories:
            self._add(category)

    @classmethod
    def load(cls, path: Optional[str] = None) -> "Vocabulary":
        """The built-in vocabulary, or a JSON file ``{"categories": [{"name", "synonyms"}]}`` / a list of names."""
        with open(path or DEFAULT_PATH) as handle:
            data = json.load(handle)
        items = data["categories"] if isinstance(data, dict) else data
        categories = []
        for index, item in enumerate(items, 1):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
                raise ValueError(f"vocabulary file {path}: entry {index} has no name: {item!r}")
            categories.append(Category(index, item["name"], list(item.get("synonyms", []))))
        return cls(categories)

    def _add(self, category: Category) -> None:
        if category.name in self._exact:
            raise ValueError(f"duplicate category name {category.name!r}")
        self.categories.append(category)
        self._exact[category.name] = category
        for alias in [category.name, *category.synonyms]:
            self._spellings.setdefault(spelling_key(alias), category)
            self._aliases.setdefault(normalise(alias), category)  # the first category with a spelling keeps it

    def __len__(self) -> int:
        return len(self.categories)

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def labels(self) -> Dict[str, int]:
        """``{training name: index}``, as served in MONAI Label's ``/info``."""
        return {c.name: c.index for c in self.categories}

    def by_index(self, index: int) -> Category:
        if not 1 <= index <= len(self.categories):
            raise BadTextError(f"label index {index} is not in the vocabulary (1..{len(self.categories)})")
        return self.categories[index - 1]

    def find(self, name: str) -> Optional[Category]:
        if not isinstance(name, str):
            return None
        return self._exact.get(name) or self._spellings.get(spelling_key(name)) or self._aliases.get(normalise(name))

    def closest(self, name: str, count: int = 5) -> List[str]:
        keys = difflib.get_close_matches(spelling_key(str(name)), list(self._spellings), n=count * 2, cutoff=0.5)
        names = list(dict.fromkeys(self._spellings[k].name for k in keys))
        return names[:count]

    def resolve(self, name: str, allow_free_text: bool = False) -> str:
        """The text prompt for ``name``: its training string, or ``name`` itself as free text when allowed."""
        category = self.find(name)
        if category is not None:
            return category.name
        if allow_free_text and isinstance(name, str) and name.strip():
            return name.strip()
        suggestions = self.closest(name)
        hint = f"; closest known names: {', '.join(repr(s) for s in suggestions)}" if suggestions else ""
        raise BadTextError(
            f"unknown label {name!r}{hint}. Send it as free text with \"free_text\": true, or pick a name from /info"
        )

    def extend(self, names: Sequence[str]) -> List[str]:
        """Add names learned by fine-tuning (those not already known); returns the added ones."""
        added = []
        for name in names:
            if isinstance(name, str) and name.strip() and self.find(name) is None:
                self._add(Category(len(self.categories) + 1, name.strip(), learned=True))
                added.append(name.strip())
        return added

    def to_json(self) -> List[dict]:
        return [{"index": c.index, "name": c.name, "synonyms": c.synonyms, "learned": c.learned}
                for c in self.categories]
