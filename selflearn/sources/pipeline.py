"""One cleaning pipeline for every article: normalise, drop short, dedup, filter, hash."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from .base import Article

_WS = re.compile(r"[ \t\f\v\u00a0]+")
_NL = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+", re.UNICODE)

# A deliberately small default: slurs and obvious spam markers are the operator's call to extend.
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "viagra", "casino bonus", "buy followers", "porn", "xxx",
)


class ContentFilter(Protocol):
    def __call__(self, article: Article) -> str | None:
        """Return a reason to drop the article, or None to keep it."""


@dataclass
class BlocklistFilter:
    terms: Iterable[str] = DEFAULT_BLOCKLIST

    def __post_init__(self) -> None:
        words = [t.strip().lower() for t in self.terms if t.strip()]
        self._re = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.I) if words else None

    def __call__(self, article: Article) -> str | None:
        if self._re is None:
            return None
        m = self._re.search(article.title + "\n" + article.text)
        return f"blocklisted term {m.group(1).lower()!r}" if m else None


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_WS.sub(" ", line).strip() for line in text.split("\n")]
    return _NL.sub("\n\n", "\n".join(lines)).strip()


def _shingles(text: str, k: int = 5) -> set[int]:
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return {hash(" ".join(words))}
    return {hash(" ".join(words[i:i + k])) for i in range(len(words) - k + 1)}


@dataclass
class PipelineResult:
    kept: list[Article] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (title, reason)


def clean_articles(
    articles: Iterable[Article],
    *,
    min_chars: int = 200,
    near_dup_threshold: float = 0.8,
    filters: Iterable[ContentFilter | Callable[[Article], str | None]] = (),
    seen_sha256: Iterable[str] = (),
) -> PipelineResult:
    """Normalise, then drop short texts, exact and near duplicates (also against `seen_sha256`
    from earlier rounds) and whatever a content filter rejects. Kept articles carry a sha256."""
    out = PipelineResult()
    seen = set(seen_sha256)
    kept_shingles: list[set[int]] = []
    filters = list(filters)
    for art in articles:
        text = normalize_text(art.text or "")
        title = normalize_text(art.title or "") or "(untitled)"
        if len(text) < min_chars:
            out.dropped.append((title, f"too short ({len(text)} < {min_chars} chars)"))
            continue
        art = Article(**{**art.__dict__, "title": title, "text": text})
        art.sha256 = art.digest()
        if art.sha256 in seen:
            out.dropped.append((title, "exact duplicate"))
            continue
        reason = next((r for f in filters if (r := f(art))), None)
        if reason:
            out.dropped.append((title, reason))
            continue
        sh = _shingles(text)
        near = next((j for j in kept_shingles if len(sh & j) / max(1, len(sh | j)) >= near_dup_threshold), None)
        if near is not None:
            out.dropped.append((title, "near duplicate"))
            continue
        seen.add(art.sha256)
        kept_shingles.append(sh)
        out.kept.append(art)
    return out
