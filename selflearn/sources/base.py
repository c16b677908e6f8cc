"""The article record every source produces, and the source protocol."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class Article:
    title: str
    text: str
    # Where it came from: "wikipedia:en", "snapshot:en", "file", "url".
    source: str
    url: str | None = None
    page_id: int | None = None
    revision: int | str | None = None
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def provenance(self) -> dict[str, Any]:
        """What a manifest records about the article (not its text)."""
        d = asdict(self)
        d.pop("text")
        d.pop("extra")
        d["chars"] = len(self.text)
        return d


class Source(Protocol):
    """A source of fresh articles.

    `fetch` returns up to `n` articles not returned before, given the cursor persisted from the
    previous round, and the cursor to persist after this one. Cursors are plain JSON.
    """

    name: str

    def fetch(self, n: int, cursor: dict[str, Any]) -> tuple[list[Article], dict[str, Any]]: ...
