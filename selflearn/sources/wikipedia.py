"""Live Wikipedia: N random articles of one language per round.

Two APIs, same result:

- `action` (default): `/w/api.php?action=query&generator=random&prop=extracts|info|...` returns up
  to 20 random pages per request with their whole lead section as plain text (`exintro`,
  `explaintext`), the latest revision id and the canonical URL. Few requests, long texts.
- `rest`: `/api/rest_v1/page/random/summary` returns one random page summary per request
  (title, pageid, revision, extract, content_urls). Its extract is the first paragraph only.

The client is polite (see `polite.py`, `WIKIPEDIA_HTTP`): a User-Agent naming the project and a
contact URL, one request per `min_interval`, bounded retries with backoff on 429/5xx/timeouts.
Answers that are not usable (malformed JSON, an empty extract, a disambiguation page, a page
already seen) are skipped; the client keeps asking until it has N articles or has spent
`max_requests` requests.

Cleaning (whitespace, minimum length, dedup, filters) is the pipeline's job, not the client's.
The cursor remembers the page ids fetched in earlier rounds (the most recent `max_seen`), so a
later round does not learn the same page twice.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal, TypeGuard
from urllib.parse import quote, urlsplit

from .base import Article
from .polite import WIKIPEDIA_HTTP, HttpPolicy, PoliteSession, SourceHTTPError

log = logging.getLogger(__name__)

ACTION_BATCH = 20  # TextExtracts returns at most 20 intro extracts per request (exlimit=max)
RETRYABLE_API_ERRORS = frozenset({"maxlag", "ratelimited", "readonly", "internal_api_error_DBQueryError"})


class WikipediaError(SourceHTTPError):
    """The Wikipedia API could not be reached or refused the request for good."""


class WikipediaClient:
    """Source protocol over live Wikipedia. `name` is "wikipedia:<language>"."""

    def __init__(self, language: str = "en", *, endpoint: str | None = None,
                 api: Literal["action", "rest"] | None = None, intro_only: bool = True,
                 policy: HttpPolicy = WIKIPEDIA_HTTP, max_requests: int | None = None, max_seen: int = 20000):
        """
        endpoint: the wiki's base URL, default `https://<language>.wikipedia.org` (`{lang}` in it
            is replaced by the language). A URL ending in `/api/rest_v1` selects the REST API and
            one ending in `api.php` the action API, unless `api` says otherwise.
        intro_only: action API only; False fetches whole articles, one page per request.
        policy: the User-Agent, rate limit, timeouts, retries and size cap of every request.
        max_requests: requests one `fetch` may spend; default scales with N.
        max_seen: how many fetched page ids the cursor remembers.
        """
        if not language or not language.replace("-", "").isalnum():
            raise ValueError(f"invalid Wikipedia language {language!r}")
        self.language = language
        self.name = f"wikipedia:{language}"
        self.intro_only = intro_only
        self.max_requests = max_requests
        self.max_seen = max_seen
        base = (endpoint or "https://{lang}.wikipedia.org").replace("{lang}", language).rstrip("/")
        self.site, self.rest_base, self.action_url, detected = _split_endpoint(base)
        self.api: Literal["action", "rest"] = api or detected
        if self.api not in ("action", "rest"):
            raise ValueError(f"api must be 'action' or 'rest', got {api!r}")
        self.http = PoliteSession(policy)
        self.http.session.headers.setdefault("Accept", "application/json")
        self.last_skipped: dict[str, int] = {}

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "WikipediaClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- Source protocol ----------------------------------------------------------------------

    def fetch(self, n: int, cursor: dict[str, Any] | None) -> tuple[list[Article], dict[str, Any]]:
        """Up to `n` random articles not fetched in earlier rounds, and the cursor to persist.

        Raises WikipediaError when a request fails for good (retries exhausted, a 4xx answer).
        Returns fewer than `n` articles, with a warning, if `max_requests` runs out first.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        cursor = cursor if isinstance(cursor, dict) else {}
        seen_list = [int(p) for p in cursor.get("seen_page_ids", []) if isinstance(p, int) or str(p).isdigit()]
        seen = set(seen_list)
        skipped = {"malformed": 0, "empty": 0, "seen": 0, "disambiguation": 0, "api_error": 0}
        articles: list[Article] = []
        per_request = 1 if self.api == "rest" or not self.intro_only else ACTION_BATCH
        budget = self.max_requests or (2 * math.ceil(n / per_request) + 5)
        used = 0
        while len(articles) < n and used < budget:
            used += 1
            want = min(per_request, n - len(articles))
            for item in self._request(want):
                if isinstance(item, str):  # why the answer was unusable
                    skipped[item] += 1
                    continue
                page_id = item.page_id
                assert page_id is not None  # both parsers set it: the cursor remembers pages by it
                if page_id in seen:
                    skipped["seen"] += 1
                    continue
                seen.add(page_id)
                seen_list.append(page_id)
                articles.append(item)
                if len(articles) == n:
                    break
        self.last_skipped = skipped
        if len(articles) < n:
            log.warning("%s: got %d of %d articles after %d requests (skipped %s)",
                        self.name, len(articles), n, used, skipped)
        new_cursor = {
            **{k: v for k, v in cursor.items() if k != "seen_page_ids"},
            "seen_page_ids": seen_list[-self.max_seen:],
            "fetched_total": int(cursor.get("fetched_total", 0) or 0) + len(articles),
        }
        return articles, new_cursor

    # -- one request --------------------------------------------------------------------------

    def _request(self, want: int) -> list[Article | str]:
        """One API request; returns Articles and, for unusable answers, the reason as a string."""
        if self.api == "rest":
            url, params = f"{self.rest_base}/page/random/summary", None
        else:
            url, params = self.action_url, self._action_params(want)
        try:
            fetched = self.http.get(url, params=params)
        except SourceHTTPError as err:
            raise WikipediaError(f"{self.name}: {err}", url=err.url, status=err.status,
                                 attempts=err.attempts) from None
        try:
            doc = json.loads(fetched.content)
        except (ValueError, UnicodeDecodeError):
            log.warning("%s: skipping malformed JSON from %s (%d bytes)", self.name, fetched.url, len(fetched.content))
            return ["malformed"]
        if not isinstance(doc, dict):
            return ["malformed"]
        if self.api == "rest":
            return [self._from_summary(doc)]
        if "error" in doc:
            return self._action_error(doc, url)
        return self._from_action(doc)

    def _action_error(self, doc: dict[str, Any], url: str) -> list[Article | str]:
        # The action API reports some overload conditions as HTTP 200 with an error body: back
        # off, and let the request budget bound how often that can happen.
        err = doc.get("error") or {}
        code = str(err.get("code", "unknown")) if isinstance(err, dict) else "unknown"
        info = str(err.get("info", "")) if isinstance(err, dict) else str(err)
        if code in RETRYABLE_API_ERRORS:
            delay = self.http.backoff(0)
            log.warning("%s: API error %s (%s); backing off %.2fs", self.name, code, info, delay)
            self.http.wait(delay)
            return ["api_error"]
        raise WikipediaError(f"{self.name}: API error {code}: {info}", url=url, status=200)

    def _action_params(self, want: int) -> dict[str, Any]:
        params: dict[str, Any] = {
            "action": "query",
            "format": "json",
            "formatversion": "2",
            "generator": "random",
            "grnnamespace": "0",
            "grnlimit": str(want),
            "prop": "extracts|info|revisions|pageprops",
            "explaintext": "1",
            "exsectionformat": "plain",
            "exlimit": "max",
            "inprop": "url",
            "rvprop": "ids|timestamp",
            "ppprop": "disambiguation",
        }
        if self.intro_only:
            params["exintro"] = "1"
        return params

    # -- parsing ------------------------------------------------------------------------------

    def _from_summary(self, doc: dict[str, Any]) -> Article | str:
        """A REST page summary (https://www.mediawiki.org/wiki/Specs/Summary/1.4.0)."""
        # `title` is the canonical form (underscores) in current responses; prefer the readable one.
        titles = doc.get("titles")
        title = (titles.get("normalized") if isinstance(titles, dict) else None) or doc.get("title")
        title = title.replace("_", " ") if isinstance(title, str) else title
        page_id = doc.get("pageid")
        if not isinstance(title, str) or not _is_int(page_id):
            return "malformed"
        if doc.get("type") == "disambiguation":
            return "disambiguation"
        extract = doc.get("extract")
        if not isinstance(extract, str) or not extract.strip():
            return "empty"
        url = ((doc.get("content_urls") or {}).get("desktop") or {}).get("page") or self._page_url(title)
        return Article(
            title=title, text=extract, source=self.name, url=url, page_id=int(page_id),
            revision=_revision(doc.get("revision")),
            extra={"api": "rest", "lang": doc.get("lang", self.language), "timestamp": doc.get("timestamp"),
                   "description": doc.get("description")},
        )

    def _from_action(self, doc: dict[str, Any]) -> list[Article | str]:
        pages = (doc.get("query") or {}).get("pages") if isinstance(doc.get("query"), dict) else None
        if isinstance(pages, dict):  # formatversion=1: keyed by page id
            pages = list(pages.values())
        if not isinstance(pages, list):
            return ["malformed"]
        out: list[Article | str] = []
        for page in pages:
            if not isinstance(page, dict) or not isinstance(page.get("title"), str) or not _is_int(page.get("pageid")):
                out.append("malformed")
                continue
            if page.get("ns", 0) != 0:
                continue
            if "disambiguation" in (page.get("pageprops") or {}):
                out.append("disambiguation")
                continue
            extract = page.get("extract")
            if not isinstance(extract, str) or not extract.strip():
                out.append("empty")
                continue
            revs = page.get("revisions") or [{}]
            revision = revs[0].get("revid") if isinstance(revs[0], dict) else None
            out.append(Article(
                title=page["title"], text=extract, source=self.name,
                url=page.get("canonicalurl") or page.get("fullurl") or self._page_url(page["title"]),
                page_id=int(page["pageid"]), revision=_revision(revision or page.get("lastrevid")),
                extra={"api": "action", "lang": page.get("pagelanguage", self.language),
                       "timestamp": revs[0].get("timestamp") if isinstance(revs[0], dict) else None,
                       "touched": page.get("touched")},
            ))
        return out

    def _page_url(self, title: str) -> str:
        site = self.site if "wikipedia.org" in self.site else f"https://{self.language}.wikipedia.org"
        return f"{site}/wiki/{quote(title.replace(' ', '_'), safe='()_,:')}"


def _split_endpoint(base: str) -> tuple[str, str, str, Literal["action", "rest"]]:
    """(site root, REST base, action URL, API the endpoint points at)."""
    parts = urlsplit(base)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"Wikipedia endpoint must be an http(s) URL, got {base!r}")
    if base.endswith("/api/rest_v1"):
        site = base[: -len("/api/rest_v1")]
        return site, base, f"{site}/w/api.php", "rest"
    if base.endswith("api.php"):
        site = base.rsplit("/", 2)[0] if base.endswith("/w/api.php") else base.rsplit("/", 1)[0]
        return site, f"{site}/api/rest_v1", base, "action"
    return base, f"{base}/api/rest_v1", f"{base}/w/api.php", "action"


def _is_int(v: Any) -> TypeGuard[int | str]:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and v.isdigit()


def _revision(v: Any) -> int | str | None:
    # The REST summary gives the revision as a string ("1187654321"), the action API as a number.
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    s = str(v).strip()
    return int(s) if s.isdigit() else (s or None)
