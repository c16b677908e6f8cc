"""Local files and URLs: .txt, .md, .html and .pdf, each learned once (and again when it changes).

How each format becomes text is in `extract.py`.

Directories are walked recursively for those extensions (hidden files and folders skipped). URLs
are fetched politely (see `polite.py`, `FILES_HTTP`); the Content-Type decides the parser, with the URL's
extension as the fallback for generic types.

The cursor maps each learned file (its file:// URI or URL) to the sha256 of its bytes. A file
whose bytes were learned before is skipped; a changed file is learned again. For URLs the
cursor also keeps ETag/Last-Modified, so an unchanged page costs a 304 and no body.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import unquote, urlsplit

from .base import Article
from .extract import extract
from .polite import FILES_HTTP, HttpPolicy, PoliteSession, SourceHTTPError

log = logging.getLogger(__name__)

EXTENSIONS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
              ".html": "html", ".htm": "html", ".xhtml": "html", ".pdf": "pdf"}
CONTENT_TYPES = {"text/plain": "text", "text/markdown": "markdown", "text/x-markdown": "markdown",
                 "text/html": "html", "application/xhtml+xml": "html", "application/pdf": "pdf",
                 "application/x-pdf": "pdf"}
GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}


@dataclass(frozen=True)
class _Item:
    key: str            # file:// URI or URL: the article's url and the cursor's key
    path: Path | None   # local file, or None for a URL
    explicit: bool      # named in the spec (errors are raised) rather than found in a folder


class FilesClient:
    """Source protocol over local files, folders and URLs. `name` is "files"."""

    name = "files"

    def __init__(self, paths: Sequence[str | os.PathLike[str]] = (), urls: Sequence[str] = (), *,
                 policy: HttpPolicy = FILES_HTTP):
        """Raises ValueError for a path that does not exist, a file of an unsupported type or a
        URL that is not http(s). `policy.max_bytes` caps one file or download."""
        if not paths and not urls:
            raise ValueError("a files source needs at least one path or url")
        self.paths = [self._local(p) for p in paths]
        for p in self.paths:
            if p.is_file():
                _kind_for_path(p)  # unsupported type: fail now, before any training
        self.urls = [str(u) for u in urls]
        for u in self.urls:
            if urlsplit(u).scheme not in ("http", "https") or not urlsplit(u).netloc:
                raise ValueError(f"files source: {u!r} is not an http(s) URL")
        self.max_bytes = policy.max_bytes
        self.http = PoliteSession(policy)
        self.last_skipped: dict[str, int] = {}

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "FilesClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _local(p: str | os.PathLike[str]) -> Path:
        s = os.fspath(p)
        if s.startswith("file://"):
            s = unquote(urlsplit(s).path)
        path = Path(s).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"files source: {s} does not exist")
        return path

    # -- Source protocol ----------------------------------------------------------------------

    def fetch(self, n: int, cursor: dict[str, Any] | None) -> tuple[list[Article], dict[str, Any]]:
        """Up to `n` articles from files not learned before (or changed since), and the new cursor.

        Raises ValueError for a missing path, an unsupported or unreadable file named in the
        spec, or a URL of an unsupported type; SourceHTTPError when a URL cannot be fetched.
        Unreadable files found while walking a folder are skipped with a warning.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        cursor = cursor if isinstance(cursor, dict) else {}
        learned: dict[str, str] = {str(k): str(v) for k, v in (cursor.get("learned") or {}).items()}
        validators: dict[str, dict[str, str]] = dict(cursor.get("validators") or {})
        known = set(learned.values())
        skipped = {"unchanged": 0, "not_modified": 0, "no_text": 0, "unreadable": 0}
        articles: list[Article] = []
        for item in self._items():
            if len(articles) >= n:
                break
            if item.path is not None:
                got = self._read_file(item)
            else:
                got = self._read_url(item, validators if learned.get(item.key) else {})
            if got is None:
                skipped["unreadable" if item.path is not None else "not_modified"] += 1
                continue
            data, kind, charset, headers = got
            digest = hashlib.sha256(data).hexdigest()
            if item.path is None:
                v = {k: headers[h] for k, h in (("etag", "ETag"), ("last_modified", "Last-Modified")) if headers.get(h)}
                if v:
                    validators[item.key] = v
            if digest in known:
                skipped["unchanged"] += 1
                continue
            try:
                title, text, extra = extract(data, kind, charset=charset)
            except ValueError as err:
                if item.explicit:
                    raise ValueError(f"files source: {item.key}: {err}") from None
                log.warning("files source: skipping %s: %s", item.key, err)
                skipped["unreadable"] += 1
                continue
            learned[item.key] = digest
            known.add(digest)
            if not text.strip():
                log.warning("files source: %s has no extractable text (a scanned PDF?)", item.key)
                skipped["no_text"] += 1
                continue
            fallback = item.path.name if item.path else (Path(unquote(urlsplit(item.key).path)).name or item.key)
            articles.append(Article(
                title=title or fallback, text=text, source="file" if item.path else "url", url=item.key,
                revision=digest, extra={"format": kind, "bytes": len(data), **extra},
            ))
        self.last_skipped = skipped
        new_cursor = {**cursor, "learned": learned}
        if validators:
            new_cursor["validators"] = {k: v for k, v in validators.items() if k in learned}
        return articles, new_cursor

    # -- items --------------------------------------------------------------------------------

    def _items(self) -> Iterator[_Item]:
        for root in self.paths:
            if not root.exists():
                raise ValueError(f"files source: {root} does not exist")
            if root.is_file():
                yield _Item(root.as_uri(), root, True)
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    p = Path(dirpath) / f
                    if not f.startswith(".") and p.suffix.lower() in EXTENSIONS and p.is_file():
                        yield _Item(p.as_uri(), p, False)
        for u in self.urls:
            yield _Item(u, None, True)

    def _read_file(self, item: _Item) -> tuple[bytes, str, str | None, dict[str, str]] | None:
        assert item.path is not None
        try:
            size = item.path.stat().st_size
            if self.max_bytes is not None and size > self.max_bytes:
                raise ValueError(f"{size} bytes is over the {self.max_bytes}-byte limit")
            data = item.path.read_bytes()
        except (OSError, ValueError) as err:
            if item.explicit:
                raise ValueError(f"files source: cannot read {item.path}: {err}") from None
            log.warning("files source: skipping %s: %s", item.path, err)
            return None
        return data, _kind_for_path(item.path), None, {}

    def _read_url(self, item: _Item, validators: dict[str, dict[str, str]]) -> \
            tuple[bytes, str, str | None, dict[str, str]] | None:
        headers = {"Accept": "text/html, text/markdown, text/plain, application/pdf;q=0.9, */*;q=0.1"}
        v = validators.get(item.key) or {}
        if v.get("etag"):
            headers["If-None-Match"] = v["etag"]
        if v.get("last_modified"):
            headers["If-Modified-Since"] = v["last_modified"]
        try:
            fetched = self.http.get(item.key, headers=headers)
        except SourceHTTPError as err:
            raise SourceHTTPError(f"files source: {err}", url=err.url, status=err.status,
                                  attempts=err.attempts) from None
        if fetched.status == 304:
            return None
        ctype = fetched.content_type
        path_kind = EXTENSIONS.get(Path(urlsplit(fetched.url).path).suffix.lower())
        kind = CONTENT_TYPES.get(ctype)
        if ctype in GENERIC_TYPES or (kind == "text" and path_kind == "markdown"):
            kind = path_kind or kind  # e.g. raw .md files are commonly served as text/plain
        if kind is None:
            raise ValueError(f"files source: {item.key}: unsupported content type {ctype or '(none)'!r}; "
                             f"supported: {', '.join(sorted(CONTENT_TYPES))}")
        charset = None
        if "charset=" in fetched.headers.get("Content-Type", "").lower():
            charset = fetched.headers["Content-Type"].lower().split("charset=")[1].split(";")[0].strip(' "')
        return fetched.content, kind, charset, dict(fetched.headers)


def _kind_for_path(p: Path) -> str:
    kind = EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise ValueError(f"files source: {p} has an unsupported type {p.suffix or '(no extension)'!r}; "
                         f"supported: {', '.join(sorted(EXTENSIONS))}")
    return kind

