"""Polite HTTP for sources: a descriptive User-Agent, a rate limit, bounded retries.

Wikimedia's User-Agent policy asks for a client name, version and a way to reach the operator;
anonymous or generic agents get throttled or blocked. Every source that reaches the network
(the Wikipedia client, URLs of the files source) goes through `PoliteSession`, which follows one
`HttpPolicy` (the source's: `WIKIPEDIA_HTTP`, `FILES_HTTP`):

- at most one request per `min_interval` seconds (measured between request starts);
- retries on 429 (waiting at least Retry-After), 5xx, connection errors and timeouts, with
  exponential backoff and jitter, at most `max_attempts` tries per request;
- other 4xx answers fail at once: retrying a 404 or 403 helps nobody;
- a body over `max_bytes` is refused, by its Content-Length or as it arrives.

urllib3's `Retry` keeps each request's budget: which statuses it retries and when the attempts
run out. The loop around it is ours, not an `HTTPAdapter(max_retries=...)`, because between
attempts it has to do what `Retry.sleep()` does not: keep to the rate limit (retries count against
it too), sleep through the injectable `sleep` (so `Stats.waited_s` is what was really waited),
read and size-check the body inside the retry, and stop at once on a Retry-After that is too long.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import requests
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from .. import __version__ as _VERSION

log = logging.getLogger(__name__)

# Where a Wikimedia operator can find out who is calling. Override with SELFLEARN_CONTACT.
DEFAULT_CONTACT = "https://github.com/selflearn/selflearn"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 507, 508, 509, 520, 521, 522, 523, 524})


def default_user_agent(contact: str | None = None) -> str:
    contact = contact or os.environ.get("SELFLEARN_CONTACT") or DEFAULT_CONTACT
    return f"selflearn/{_VERSION} ({contact}) python-requests/{requests.__version__}"


class SourceHTTPError(RuntimeError):
    """A request failed for good: a non-retryable status, or every allowed attempt failed."""

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class ResponseTooLarge(SourceHTTPError):
    pass


@dataclass(frozen=True)
class HttpPolicy:
    """How a source behaves on the network: who it says it is, how fast it asks, how long it waits,
    how often it tries again and how much it reads. One per source, passed whole."""

    user_agent: str | None = None  # None: `default_user_agent()` (SELFLEARN_CONTACT names the contact)
    min_interval: float = 1.0      # seconds between the starts of two requests
    timeout: float | tuple[float, float] = 30.0  # seconds; (connect, read) as requests takes it
    max_attempts: int = 5          # tries per request, the first one included
    backoff_base: float = 1.0      # seconds before the 1st retry; doubles each time
    backoff_max: float = 60.0      # cap on one backoff sleep
    max_retry_after: float = 300.0  # a longer Retry-After is an error, not a 5-minute hang
    max_bytes: int | None = None   # one response's body; None: no cap

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("backoff_base and backoff_max must be >= 0")
        if self.min_interval < 0:
            raise ValueError(f"min_interval must be >= 0, got {self.min_interval}")

    def budget(self) -> Retry:
        """A fresh urllib3 `Retry` for one request: `max_attempts - 1` retries, on RETRYABLE_STATUS.

        Retry-After is honoured by `PoliteSession.get`, not by urllib3 (which would clamp a long
        one to its `retry_after_max` and wait, where here it is an error)."""
        return Retry(total=self.max_attempts - 1, status_forcelist=RETRYABLE_STATUS,
                     allowed_methods=frozenset({"GET"}), respect_retry_after_header=False, raise_on_status=False)


@dataclass
class Fetched:
    """A complete response: the body is read (and size-checked) inside the retry loop."""

    url: str
    status: int
    headers: Mapping[str, str]
    content: bytes
    attempts: int = 1

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def text(self) -> str:
        """Decode with the declared charset, else UTF-8, else a detected one."""
        charset = requests.utils.get_encoding_from_headers(CaseInsensitiveDict(self.headers))
        declared = "charset=" in self.headers.get("Content-Type", "").lower()
        return decode_bytes(self.content, charset if declared else None)


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    if charset:
        try:
            return data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is not None:
            return str(best)
    except ImportError:  # pragma: no cover - requests depends on it
        pass
    return data.decode("latin-1")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date.

    Not urllib3's `Retry.parse_retry_after`: that one reads the clock itself (no `now`), refuses
    fractional seconds, and raises on an unreadable header, where None here lets the caller fall
    back to its own backoff."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class Stats:
    requests: int = 0   # logical requests (get calls)
    attempts: int = 0   # HTTP attempts, retries included
    retries: int = 0
    throttled: int = 0  # 429 answers
    waited_s: float = 0.0  # time slept for backoff, Retry-After and the rate limit
    errors: list[str] = field(default_factory=list)


# What each source asks of the network: a Wikipedia answer is small JSON, a file may be a big PDF.
WIKIPEDIA_HTTP = HttpPolicy(timeout=20.0, max_attempts=5, backoff_max=60.0, max_bytes=8 * 1024 * 1024)
FILES_HTTP = HttpPolicy(timeout=30.0, max_attempts=4, backoff_max=30.0, max_bytes=50 * 1024 * 1024)


class PoliteSession:
    """GETs that follow an `HttpPolicy`; `sleep` and `rng` are the clock and the jitter (tests)."""

    def __init__(self, policy: HttpPolicy = HttpPolicy(), *, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        self.policy = policy
        self.user_agent = policy.user_agent or default_user_agent()
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = self.user_agent
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._last_start: float | None = None
        self.stats = Stats()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "PoliteSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- pacing -------------------------------------------------------------------------------

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self.stats.waited_s += seconds
            self._sleep(seconds)

    def _pace(self) -> None:
        """Block until `min_interval` has passed since the previous request started."""
        with self._lock:
            now = time.monotonic()
            if self._last_start is not None:
                self.wait(self._last_start + self.policy.min_interval - now)
            self._last_start = time.monotonic()

    def backoff(self, retry_index: int) -> float:
        # Exponential with "equal jitter": half fixed, half random, so clients that failed
        # together do not come back together. Not urllib3's `Retry.get_backoff_time()`, which is 0
        # before the first retry (the Wikipedia client backs off with `backoff(0)` on an API
        # error) and adds its jitter from the global `random`, not from the session's `rng`.
        cap = min(self.policy.backoff_max, self.policy.backoff_base * (2 ** retry_index))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    # -- requests -----------------------------------------------------------------------------

    def get(self, url: str, *, params: Mapping[str, Any] | None = None,
            headers: Mapping[str, str] | None = None) -> Fetched:
        """GET with pacing and retries. Returns 2xx/3xx answers (304 included) with the body read;
        raises SourceHTTPError on a non-retryable status or when attempts run out."""
        self.stats.requests += 1
        budget = self.policy.budget()
        attempts = self.policy.max_attempts
        attempt = 0
        while True:
            attempt += 1
            self._pace()
            self.stats.attempts += 1
            outcome = self._try(url, params, headers, attempt, budget)
            if isinstance(outcome, Fetched):
                return outcome
            last, delay = outcome
            self.stats.errors.append(f"{url}: {last}")
            try:
                budget = budget.increment(method="GET", url=url)
            except MaxRetryError:
                break
            delay = self.backoff(attempt - 1) if delay is None else delay
            self.stats.retries += 1
            log.warning("GET %s: %s; retry %d/%d in %.2fs", url, last, attempt, attempts - 1, delay)
            self.wait(delay)
        status = int(last.split()[1]) if last.startswith("HTTP ") else None
        raise SourceHTTPError(f"GET {url}: gave up after {attempts} attempts (last: {last})",
                              url=url, status=status, attempts=attempts)

    def _try(self, url: str, params: Mapping[str, Any] | None, headers: Mapping[str, str] | None,
             attempt: int, budget: Retry) -> Fetched | tuple[str, float | None]:
        """One attempt: the answer to return, or why it failed and how long the server asked to
        wait (None: no Retry-After, back off). Raises when retrying cannot help."""
        try:
            fetched = self._attempt(url, params, headers, attempt)
        except requests.Timeout as err:
            return f"timed out ({type(err).__name__})", None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            return f"connection error ({type(err).__name__}: {err})", None
        status = fetched.status
        if status < 400:
            return fetched
        if not budget.is_retry("GET", status):
            raise SourceHTTPError(f"GET {url}: HTTP {status} (not retried){_snippet(fetched)}",
                                  url=url, status=status, attempts=attempt)
        if status == 429:
            self.stats.throttled += 1
        retry_after = parse_retry_after(fetched.headers.get("Retry-After"))
        if retry_after is None:
            return f"HTTP {status}", None
        if retry_after > self.policy.max_retry_after:
            raise SourceHTTPError(
                f"GET {url}: HTTP {status} asks to retry after {retry_after:.0f}s, more than "
                f"the allowed {self.policy.max_retry_after:.0f}s; giving up",
                url=url, status=status, attempts=attempt)
        # Honour the server's wish, with a little jitter on top.
        return f"HTTP {status}", retry_after + self._rng.uniform(0, min(1.0, 0.1 * retry_after))

    def _attempt(self, url: str, params: Mapping[str, Any] | None, headers: Mapping[str, str] | None,
                 attempt: int) -> Fetched:
        cap = self.policy.max_bytes
        with self.session.get(url, params=params, headers=dict(headers or {}), timeout=self.policy.timeout,
                              stream=True) as resp:
            length = resp.headers.get("Content-Length")
            if cap is not None and length and length.isdigit() and int(length) > cap:
                raise ResponseTooLarge(f"GET {url}: {int(length)} bytes is over the {cap}-byte limit",
                                       url=url, status=resp.status_code, attempts=attempt)
            chunks, size = [], 0
            for chunk in resp.iter_content(64 * 1024):
                size += len(chunk)
                if cap is not None and size > cap:
                    raise ResponseTooLarge(f"GET {url}: body is over the {cap}-byte limit",
                                           url=url, status=resp.status_code, attempts=attempt)
                chunks.append(chunk)
            return Fetched(url=resp.url, status=resp.status_code, headers=resp.headers,
                           content=b"".join(chunks), attempts=attempt)


def _snippet(f: Fetched, limit: int = 200) -> str:
    body = f.content[:limit].decode("utf-8", "replace").strip()
    return f": {body}" if body else ""
