"""Category vocabulary: the names SegVol was trained on, and every spelling clients use for them.

SegVol has no class head: any string becomes the text prompt "A computerized tomography of a {name}.". It works best
with the exact strings of its training labels, so requests are resolved to those strings. Each training name is one
category with a stable index (1..N, the order of ``data/vocabulary.json``); a name resolves by, in order:

1. the exact training string;
2. its spelling: case-folded, ``_``/``-`` and camelCase split into words (``Kidney_Left`` -> ``kidney left``);
3. its normalised form: the spelling with a leading ``left``/``right`` moved to the end (``LeftParotid`` ->
   ``parotid left``).
4. its sided form: left/right anywhere moved to the end (``left rib 1`` and ``rib left 1`` -> ``rib 1 left``).
Steps 2 to 4 also search curated synonyms (``mandible`` -> ``bone mandible``, ``parotid left`` -> ``parotid gland
left``, TotalSegmentator names such as ``thyroid_gland``...), each category's served name and the client aliases.

What clients see (``labels``, served in MONAI Label's ``/info``) is one name per category: its ``display`` name when the
data file gives one (the VISTA3D class name that OHIF's Class Prompts presets look for, e.g. ``left rib 1`` for the
training text ``rib left 1``), else the training text. The model is always prompted with the training text.
``client_aliases`` are extra served names (the presets' misspellings ``dudenum``, ``esphagus``) with their own
indices from 254 downwards (``served_labels``), so they never shift when names are learned.

Names learned by fine-tuning (``extend``) join with new indices after the built-in ones; that happens only when a
checkpoint with learned names is loaded. A free-text prompt never changes the vocabulary: a request gives it a value
of its own (``free_values``).
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
ALIAS_TOP = 254  # client aliases take 254, 253, ...: stable, below 255 (OHIF's "leave unchanged" value)
UINT8_MAX = 255


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


def sided(name: str) -> str:
    """Side-insensitive key: ``left``/``right`` wherever they stand moved to the end (``left rib 1`` ->
    ``rib 1 left``)."""
    words = _words(name)
    return " ".join([w for w in words if w not in _SIDES] + [w for w in words if w in _SIDES])


@dataclass
class Category:
    index: int
    name: str  # the exact text the model was trained on
    synonyms: List[str] = field(default_factory=list)
    learned: bool = False  # added by fine-tuning
    display: Optional[str] = None  # the name served to clients, when not the training text

    @property
    def served(self) -> str:
        return self.display or self.name


class Vocabulary:
    def __init__(self, categories: Iterable[Category], client_aliases: Optional[Dict[str, str]] = None):
        self.categories: List[Category] = []
        self._exact: Dict[str, Category] = {}
        self._served: Dict[str, Category] = {}
        self._spellings: Dict[str, Category] = {}  # word order kept: prefers "kidney left" for "kidney_left"
        self._aliases: Dict[str, Category] = {}
        self._sided: Dict[str, Category] = {}
        self.client_aliases: Dict[str, int] = {}  # extra served name -> its own index (ALIAS_TOP downwards)
        self._alias_targets: Dict[int, Category] = {}
        for category in categories:
            self._add(category)
        for alias, target in (client_aliases or {}).items():
            category = self.find(target)
            if category is None:
                continue  # a custom vocabulary without that category
            index = ALIAS_TOP - len(self.client_aliases)
            self.client_aliases[alias] = index
            self._alias_targets[index] = category
            self._register(alias, category)
        if self.categories and self.max_index() >= self.first_alias_index():
            raise ValueError(f"vocabulary of {len(self.categories)} names leaves no room for client aliases")

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
            display = item.get("display")
            categories.append(Category(index, item["name"], list(item.get("synonyms", [])),
                                       display=display if isinstance(display, str) and display.strip() else None))
        aliases = data.get("client_aliases", {}) if isinstance(data, dict) else {}
        return cls(categories, aliases)

    def _add(self, category: Category) -> None:
        if category.name in self._exact:
            raise ValueError(f"duplicate category name {category.name!r}")
        if category.served in self._served:
            raise ValueError(f"duplicate served name {category.served!r}")
        self.categories.append(category)
        self._exact[category.name] = category
        self._served[category.served] = category
        for alias in [category.name, *([category.display] if category.display else []), *category.synonyms]:
            self._register(alias, category)

    def _register(self, alias: str, category: Category) -> None:
        self._spellings.setdefault(spelling_key(alias), category)  # the first category with a spelling keeps it
        self._aliases.setdefault(normalise(alias), category)
        self._sided.setdefault(sided(alias), category)

    def __len__(self) -> int:
        return len(self.categories)

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def labels(self) -> Dict[str, int]:
        """``{served name: index}``, one name per category (the app-level labels of MONAI Label's ``/info``)."""
        return {c.served: c.index for c in self.categories}

    def served_labels(self) -> Dict[str, int]:
        """``labels`` plus the client aliases with their own indices (the ``/info`` labels of the OHIF face)."""
        return {**self.labels(), **self.client_aliases}

    def max_index(self) -> int:
        return max((c.index for c in self.categories), default=0)

    def first_alias_index(self) -> int:
        return min(self.client_aliases.values(), default=UINT8_MAX + 1)

    def free_values(self) -> range:
        """Label values a request may give to names outside the vocabulary (free text): never served indices."""
        return range(self.max_index() + 1, min(self.first_alias_index(), UINT8_MAX + 1))

    def by_index(self, index: int) -> Category:
        if index in self._alias_targets:
            return self._alias_targets[index]
        if not 1 <= index <= len(self.categories):
            raise BadTextError(f"label index {index} is not in the vocabulary (1..{len(self.categories)})")
        return self.categories[index - 1]

    def find(self, name: str) -> Optional[Category]:
        if not isinstance(name, str):
            return None
        return (self._exact.get(name) or self._served.get(name) or self._spellings.get(spelling_key(name))
                or self._aliases.get(normalise(name)) or self._sided.get(sided(name)))

    def served_name(self, name: str) -> str:
        """The name clients know a known name by (its category's served name); other names unchanged."""
        category = self.find(name)
        return category.served if category is not None else name

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
                if len(self.categories) + 1 >= self.first_alias_index():
                    raise ValueError(f"cannot learn {name!r}: label values up to {self.first_alias_index() - 1} "
                                     "are taken")
                self._add(Category(len(self.categories) + 1, name.strip(), learned=True))
                added.append(name.strip())
        return added

    def to_json(self) -> List[dict]:
        return [{"index": c.index, "name": c.name, "display": c.display, "synonyms": c.synonyms,
                 "learned": c.learned} for c in self.categories]
