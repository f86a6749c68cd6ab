"""Class names: the shipped ImageNet-1K names and case-insensitive lookup with synonyms and suggestions.

A class name entry is a comma-separated list of synonyms, e.g. ``"toilet tissue, toilet paper, bathroom
tissue"``; each synonym (and the whole entry) names the class. The first synonym is the short name used
in captions.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources

__all__ = [
    "LabelIndex",
    "default_id2label",
    "get_imagenet_id2label",
    "normalize_id2label",
    "short_name",
]

IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def _imagenet_names() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("imagenet_classes.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    names = tuple(raw[str(i)] for i in range(IMAGENET_NUM_CLASSES))
    return names


def get_imagenet_id2label() -> dict[int, str]:
    """The ImageNet-1K class names shipped with the package: ``{0: "tench, Tinca tinca", ...}`` (a fresh copy)."""
    return dict(enumerate(_imagenet_names()))


def default_id2label(num_classes: int) -> dict[int, str] | None:
    """ImageNet names for a 1000-class model, else ``None`` (names then read ``"class 0"``, ...)."""
    return get_imagenet_id2label() if num_classes == IMAGENET_NUM_CLASSES else None


def normalize_id2label(id2label: Mapping | None, num_classes: int | None = None) -> dict[int, str] | None:
    """Validate ``id2label`` and turn its keys into ints (JSON stores them as strings).

    Raises:
        ValueError: a key is not an integer, lies outside ``[0, num_classes)``, or a name is empty.
    """
    if id2label is None:
        return None
    if not isinstance(id2label, Mapping):
        raise ValueError(f"id2label must be a dict {{class_id: name}}, got {type(id2label).__name__}")
    out: dict[int, str] = {}
    for key, name in id2label.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"id2label keys must be integer class ids, got {key!r}") from None
        if num_classes is not None and not 0 <= idx < num_classes:
            raise ValueError(f"id2label has class id {idx}, outside [0, {num_classes}) for this model")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"id2label[{idx}] must be a non-empty string, got {name!r}")
        out[idx] = name
    return dict(sorted(out.items()))


def _synonyms(name: str) -> list[str]:
    return [s.strip() for s in name.split(",") if s.strip()]


def short_name(name: str) -> str:
    """The first synonym of a class-name entry: ``"tench, Tinca tinca"`` -> ``"tench"``."""
    syns = _synonyms(name)
    return syns[0] if syns else name.strip()


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


class LabelIndex:
    """Look class ids up by name: case-insensitive, every synonym counts, close-match suggestions.

    Args:
        id2label: ``{class_id: "name, synonym, ..."}``; ``None`` gives names ``"class 0"`` ... for
            ``num_classes`` classes.
        num_classes: number of classes of the model (needed when ``id2label`` is ``None``).
    """

    def __init__(self, id2label: Mapping[int, str] | None, num_classes: int | None = None) -> None:
        if id2label is None:
            if num_classes is None:
                raise ValueError("LabelIndex needs id2label or num_classes")
            id2label = {i: f"class {i}" for i in range(num_classes)}
        self.id2label: dict[int, str] = normalize_id2label(id2label, num_classes) or {}
        self.num_classes = num_classes
        # exact spelling -> ids, and case-folded spelling -> ids (a synonym may name several classes,
        # e.g. ImageNet's "crane" is both a bird and a machine)
        self._exact: dict[str, list[int]] = {}
        self._folded: dict[str, list[int]] = {}
        self._primary: dict[int, str] = {}
        self._display: dict[str, str] = {}  # case-folded -> spelling as written, for messages
        for idx, name in self.id2label.items():
            syns = _synonyms(name)
            self._primary[idx] = _key(syns[0]) if syns else _key(name)
            for text in dict.fromkeys([name.strip(), *syns]):
                self._exact.setdefault(" ".join(text.split()), []).append(idx)
                self._display.setdefault(_key(text), " ".join(text.split()))
                ids = self._folded.setdefault(_key(text), [])
                if idx not in ids:
                    ids.append(idx)

    @property
    def names(self) -> dict[str, int]:
        """Every unambiguous synonym -> class id (like ``DiTPipeline.labels``), sorted by name."""
        out = {}
        for text, ids in self._exact.items():
            if len(ids) == 1:
                out[text] = ids[0]
        return dict(sorted(out.items()))

    def name(self, class_id: int, short: bool = True) -> str:
        """The name of ``class_id`` (its first synonym when ``short``)."""
        full = self.id2label.get(int(class_id), f"class {int(class_id)}")
        return short_name(full) if short else full

    def suggest(self, query: str, n: int = 5) -> list[str]:
        """Up to ``n`` known names closest to ``query``, each as ``"name (id)"``.

        Names containing ``query`` as a word come first (shortest first), then difflib's close matches.
        """
        q = _key(query)
        contains = []
        if len(q) >= 3:
            contains = sorted((k for k in self._folded if f" {q} " in f" {k} "), key=len)[:n]
        close = difflib.get_close_matches(q, list(self._folded), n=n, cutoff=0.6)
        matches = list(dict.fromkeys(contains + close))[:n]
        return [f"{self._display[m]!r} ({', '.join(map(str, self._folded[m]))})" for m in matches]

    def lookup(self, label: str) -> int:
        """The class id named by ``label``.

        Resolution: exact spelling first, then case-insensitive; if a name belongs to several classes, the
        class whose first synonym it is wins; a name still ambiguous raises.

        Raises:
            ValueError: unknown name (with the closest names) or an ambiguous name (with the candidates).
        """
        if not isinstance(label, str):
            raise ValueError(f"a class name must be a string, got {type(label).__name__}: {label!r}")
        ids = self._exact.get(" ".join(label.split())) or self._folded.get(_key(label))
        if not ids:
            hint = self.suggest(label)
            msg = f"unknown class name {label!r}."
            if hint:
                msg += f" Did you mean: {', '.join(hint)}?"
            else:
                msg += " Pass a class id or one of the names in `pipe.labels`."
            raise ValueError(msg)
        if len(ids) > 1:
            primary = [i for i in ids if self._primary[i] == _key(label)]
            if len(primary) == 1:
                return primary[0]
            options = ", ".join(f"{i} ({self.id2label[i]!r})" for i in ids)
            raise ValueError(f"class name {label!r} is ambiguous: it names classes {options}; pass the class id")
        return ids[0]

    def lookup_many(self, labels: str | Iterable[str]) -> list[int]:
        """``lookup`` for one name or a list of names (a single string is one name, not its characters)."""
        if isinstance(labels, str):
            return [self.lookup(labels)]
        return [self.lookup(label) for label in labels]
