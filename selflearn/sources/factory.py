"""Build Source objects from a spec's `sources` list."""

from __future__ import annotations

from ..spec import LearnerRunSpec, SourceSpec


def build_source(s: SourceSpec):
    if s.snapshot is not None:
        from .snapshot import SnapshotSource

        return SnapshotSource(s.snapshot.language)
    if s.wikipedia is not None:
        from .wikipedia import WikipediaClient

        return WikipediaClient(language=s.wikipedia.language, endpoint=s.wikipedia.endpoint)
    from .files import FilesSource

    return FilesSource(paths=s.files.paths, urls=s.files.urls)


def build_sources(spec: LearnerRunSpec) -> list:
    """The article sources (feedback is read by selflearn.sources.feedback, not as articles)."""
    return [build_source(s) for s in spec.article_sources]


def general_language(spec: LearnerRunSpec) -> str:
    """The general set follows the run's language where the offline snapshot has it."""
    for s in spec.article_sources:
        lang = (s.snapshot or s.wikipedia).language if (s.snapshot or s.wikipedia) else None
        if lang:
            lang = lang.split("-")[0]
            return lang if lang in ("en", "fr", "es") else "en"
    return "en"
