"""Build Source objects from a spec's `sources` list."""

from __future__ import annotations

from ..spec import LearnerRunSpec, SourceSpec
from .base import Source


def build_source(s: SourceSpec) -> Source:
    """The source a spec entry names; a network source follows its kind's `HttpPolicy` (polite.py)."""
    if s.snapshot is not None:
        from .snapshot import SnapshotSource

        return SnapshotSource(s.snapshot.language)
    if s.wikipedia is not None:
        from .wikipedia import WikipediaClient

        return WikipediaClient(s.wikipedia.language, endpoint=s.wikipedia.endpoint)
    from .files import FilesClient

    if s.files is None:
        raise ValueError(f"a {s.kind} source yields no articles")
    return FilesClient(s.files.paths, s.files.urls)


def build_sources(spec: LearnerRunSpec) -> list[Source]:
    """The article sources (feedback is read by selflearn.sources.feedback, not as articles)."""
    return [build_source(s) for s in spec.article_sources]


def general_language(spec: LearnerRunSpec) -> str:
    """The general set follows the run's language where the offline snapshot has it."""
    for s in spec.article_sources:
        named = s.snapshot or s.wikipedia
        if named is not None and named.language:
            lang = named.language.split("-")[0]
            return lang if lang in ("en", "fr", "es") else "en"
    return "en"
