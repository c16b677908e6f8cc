"""The live Wikipedia client against recorded API responses replayed by a real local HTTP server."""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import fields, replace
from email.utils import formatdate
from pathlib import Path

import pytest

from replay_server import Reply, ReplayServer
from selflearn.sources.factory import build_source
from selflearn.sources.pipeline import clean_articles
from selflearn.sources.polite import WIKIPEDIA_HTTP, HttpPolicy, parse_retry_after
from selflearn.sources.wikipedia import WikipediaClient, WikipediaError
from selflearn.spec import SourceSpec, WikipediaSource

DATA = Path(__file__).parent / "data" / "wikipedia"
REST_RANDOM = "/api/rest_v1/page/random/summary"
ACTION = "/w/api.php"


def recorded(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


SUMMARIES = [recorded(p.name) for p in sorted(DATA.glob("rest_summary_0*.json"))]


def summary_reply(doc: dict) -> Reply:
    return Reply(200, doc, content_type='application/json; charset=utf-8; '
                                      'profile="https://www.mediawiki.org/wiki/Specs/Summary/1.5.0"')


def serve_rest(server: ReplayServer, docs=SUMMARIES) -> None:
    """Like Wikipedia: /page/random/summary answers 303 See Other to /page/summary/<Title>."""
    cycle = itertools.cycle(docs)

    def random_summary(_seen):
        doc = next(cycle)
        path = f"/api/rest_v1/page/summary/{doc['titles']['canonical']}"
        server.script(path, summary_reply(doc))
        return Reply(303, b"", headers={"Location": path, "Cache-Control": "no-cache"})

    server.fallback(REST_RANDOM, random_summary)


# Test-sized politeness: no rate limit, tiny backoff.
FAST = replace(WIKIPEDIA_HTTP, min_interval=0.0, timeout=2.0, max_attempts=3, backoff_base=0.02, backoff_max=0.1)
POLICY_FIELDS = {f.name for f in fields(HttpPolicy)}


def client(server: ReplayServer, language: str = "en", **kw) -> WikipediaClient:
    """A client of `server` with FAST's politeness; `kw`: the client's options and HttpPolicy fields."""
    policy = replace(FAST, **{k: kw.pop(k) for k in list(kw) if k in POLICY_FIELDS})
    return WikipediaClient(language, endpoint=server.url, policy=policy, **kw)


@pytest.fixture
def server():
    with ReplayServer() as s:
        yield s


def test_rest_returns_n_articles_with_provenance(server):
    serve_rest(server)
    with client(server, api="rest") as wiki:
        arts, cursor = wiki.fetch(3, {})
    assert wiki.name == "wikipedia:en"
    assert [a.title for a in arts] == ["Basalt", "Tardigrade", "Lake Baikal"]
    baikal = arts[2]
    assert baikal.page_id == 57889 and baikal.revision == 1223302117  # the REST revision is a string
    assert baikal.url == "https://en.wikipedia.org/wiki/Lake_Baikal"
    assert baikal.source == "wikipedia:en" and baikal.text.startswith("Lake Baikal is a rift lake")
    assert cursor["seen_page_ids"] == [4849, 30709, 57889]
    # Politeness: every request names the project and a contact URL.
    ua = server.hits(REST_RANDOM)[0].headers["User-Agent"]
    assert ua.startswith("selflearn/") and "(https://" in ua
    # The articles are raw; the shared pipeline keeps them and hashes them.
    kept = clean_articles(arts).kept
    assert len(kept) == 3 and all(len(a.sha256) == 64 for a in kept)


def test_later_round_skips_pages_seen_before(server):
    serve_rest(server)
    with client(server, api="rest") as wiki:
        first, cursor = wiki.fetch(3, {})
        json.dumps(cursor)  # the trainer persists it as JSON
        serve_rest(server)  # the "random" stream starts over: the first three come again
        second, cursor2 = wiki.fetch(3, json.loads(json.dumps(cursor)))
    assert {a.page_id for a in first}.isdisjoint(a.page_id for a in second)
    assert [a.title for a in second] == ["Ada Lovelace", "Common kestrel", "Halley's Comet"]
    assert wiki.last_skipped["seen"] == 3
    assert len(cursor2["seen_page_ids"]) == 6 and cursor2["fetched_total"] == 6


def test_cursor_is_bounded(server):
    serve_rest(server)
    old = {"seen_page_ids": list(range(1, 101)), "fetched_total": 100}
    with client(server, api="rest", max_seen=5) as wiki:
        _, cursor = wiki.fetch(2, old)
    assert cursor["seen_page_ids"] == [98, 99, 100, 4849, 30709]


def test_action_api_batches_and_skips_unusable_pages(server):
    server.script(ACTION, Reply(200, recorded("action_random_batch1.json")),
                  Reply(200, recorded("action_random_batch2.json")))
    with client(server) as wiki:  # the action API is the default
        arts, cursor = wiki.fetch(5, {})
    assert [a.title for a in arts] == ["Printing press", "Mitochondrion", "Fibonacci sequence",
                                       "Great Barrier Reef", "Kakapo"]
    # Skipped: an empty extract, a disambiguation page, and Mitochondrion served twice.
    assert wiki.last_skipped == {"malformed": 0, "empty": 1, "seen": 1, "disambiguation": 1, "api_error": 0}
    mito = arts[1]
    assert (mito.page_id, mito.revision, mito.url) == (19588, 1223120778, "https://en.wikipedia.org/wiki/Mitochondrion")
    assert "\n" in mito.text  # the whole lead section, paragraphs kept
    hits = server.hits(ACTION)
    assert len(hits) == 2
    q = hits[0]
    assert (q.param("action"), q.param("generator"), q.param("grnnamespace")) == ("query", "random", "0")
    assert q.param("explaintext") == "1" and q.param("exintro") == "1" and q.param("formatversion") == "2"
    assert set(q.param("prop").split("|")) >= {"extracts", "info", "revisions"}
    assert q.param("grnlimit") == "5" and hits[1].param("grnlimit") == "2"
    assert cursor["seen_page_ids"] == [23998, 19588, 10939, 12969, 293542]


def test_429_waits_for_retry_after(server):
    serve_rest(server)
    server.script(REST_RANDOM, Reply(429, {"type": "https://mediawiki.org/wiki/HyperSwitch/errors/rate_limit",
                                           "title": "Too many requests"}, headers={"Retry-After": "1"}))
    with client(server, api="rest") as wiki:
        arts, _ = wiki.fetch(1, {})
    assert [a.title for a in arts] == ["Basalt"]
    first, second = server.hits(REST_RANDOM)[:2]
    assert second.t - first.t >= 0.95  # the client waited as asked before trying again
    assert wiki.http.stats.throttled == 1 and wiki.http.stats.retries == 1


def test_5xx_then_success(server):
    serve_rest(server)
    server.script(REST_RANDOM, Reply(503, "upstream connect error", content_type="text/plain"),
                  Reply(502, "<html><body>Bad Gateway</body></html>", content_type="text/html"))
    with client(server, api="rest") as wiki:
        arts, _ = wiki.fetch(1, {})
    assert [a.title for a in arts] == ["Basalt"]
    assert len(server.hits(REST_RANDOM)) == 3 and wiki.http.stats.retries == 2


def test_timeout_then_success(server):
    serve_rest(server)
    server.script(REST_RANDOM, Reply(200, SUMMARIES[5], delay=1.0))  # answers after the client gave up
    t0 = time.monotonic()
    with client(server, api="rest", timeout=0.25) as wiki:
        arts, _ = wiki.fetch(1, {})
    assert [a.title for a in arts] == ["Basalt"]
    assert len(server.hits(REST_RANDOM)) == 2 and wiki.http.stats.retries == 1
    assert time.monotonic() - t0 < 1.0


def test_gives_up_after_bounded_attempts(server):
    server.fallback(REST_RANDOM, lambda _s: Reply(503, "Service Unavailable", content_type="text/plain"))
    with client(server, api="rest", max_attempts=3) as wiki, pytest.raises(WikipediaError) as err:
        wiki.fetch(2, {})
    assert "gave up after 3 attempts" in str(err.value) and "HTTP 503" in str(err.value)
    assert err.value.status == 503
    assert len(server.hits(REST_RANDOM)) == 3


def test_unreachable_server_is_a_clear_error():
    with ReplayServer() as s:
        url = s.url  # the port is closed once the server is gone
    wiki = WikipediaClient("en", endpoint=url, policy=replace(FAST, timeout=1, max_attempts=2, backoff_base=0.01))
    with pytest.raises(WikipediaError, match=r"gave up after 2 attempts \(last: connection error"):
        wiki.fetch(1, {})


def test_client_error_is_not_retried(server):
    server.script(ACTION, Reply(403, "Scripts should use an informative User-Agent string", content_type="text/plain"))
    with client(server) as wiki, pytest.raises(WikipediaError, match="HTTP 403"):
        wiki.fetch(1, {})
    assert len(server.hits(ACTION)) == 1


def test_retry_after_beyond_limit_is_a_clear_error(server):
    server.script(REST_RANDOM, Reply(429, "", headers={"Retry-After": "3600"}))
    with client(server, api="rest", max_retry_after=60) as wiki, pytest.raises(WikipediaError, match="3600s"):
        wiki.fetch(1, {})
    assert len(server.hits(REST_RANDOM)) == 1


def test_malformed_json_and_empty_extracts_are_skipped(server):
    serve_rest(server)
    truncated = (DATA / "rest_summary_truncated.json").read_bytes()
    server.script(REST_RANDOM,
                  Reply(200, truncated),
                  Reply(200, "<!DOCTYPE html><html><body>Wikimedia Error</body></html>"),
                  summary_reply(recorded("rest_summary_no_extract.json")),
                  summary_reply(recorded("rest_summary_disambiguation.json")),
                  Reply(200, ["not", "a", "summary"]))
    with client(server, api="rest") as wiki:
        arts, cursor = wiki.fetch(2, {})
    assert [a.title for a in arts] == ["Basalt", "Tardigrade"]
    assert wiki.last_skipped == {"malformed": 3, "empty": 1, "seen": 0, "disambiguation": 1, "api_error": 0}
    assert cursor["seen_page_ids"] == [4849, 30709]


def test_stops_after_request_budget(server, caplog):
    server.fallback(REST_RANDOM, lambda _s: summary_reply(recorded("rest_summary_no_extract.json")))
    with client(server, api="rest", max_requests=4) as wiki, caplog.at_level(logging.WARNING):
        arts, cursor = wiki.fetch(3, {"seen_page_ids": [1]})
    assert arts == [] and len(server.hits(REST_RANDOM)) == 4
    assert "got 0 of 3 articles after 4 requests" in caplog.text
    assert cursor["seen_page_ids"] == [1]


def test_action_api_maxlag_backs_off_then_continues(server):
    server.script(ACTION, Reply(200, recorded("action_error_maxlag.json"), headers={"Retry-After": "5"}),
                  Reply(200, recorded("action_random_batch2.json")))
    with client(server) as wiki:
        arts, _ = wiki.fetch(3, {})
    assert [a.title for a in arts] == ["Mitochondrion", "Great Barrier Reef", "Kakapo"]
    assert wiki.last_skipped["api_error"] == 1


def test_rate_limit_spaces_requests(server):
    serve_rest(server)
    with client(server, api="rest", min_interval=0.2) as wiki:
        arts, _ = wiki.fetch(4, {})
    assert len(arts) == 4
    times = [h.t for h in server.hits(REST_RANDOM)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3 and min(gaps) >= 0.16, gaps  # 0.2 s apart, with slack for scheduling


def test_the_spec_builds_a_wikipedia_source_of_its_language_and_endpoint(server):
    """What a run's `wikipedia` source becomes (sources/factory.py), with Wikipedia's HTTP policy."""
    fr = recorded("rest_summary_fr_Tour_Eiffel.json")
    serve_rest(server, [fr])
    spec = SourceSpec(wikipedia=WikipediaSource(language="fr", articlesPerRound=1,
                                                endpoint=server.url + "/api/rest_v1"))
    with build_source(spec) as wiki:
        assert isinstance(wiki, WikipediaClient) and wiki.http.policy == WIKIPEDIA_HTTP
        assert wiki.name == "wikipedia:fr" and wiki.api == "rest"  # a REST base URL selects the REST API
        arts, _ = wiki.fetch(1, {})
    assert arts[0].title == "La tour Eiffel" and arts[0].url.startswith("https://fr.wikipedia.org/wiki/")
    assert arts[0].extra["lang"] == "fr"
    default = WikipediaClient("de")
    assert default.action_url == "https://de.wikipedia.org/w/api.php"
    assert default.rest_base == "https://de.wikipedia.org/api/rest_v1"
    with pytest.raises(ValueError):
        WikipediaClient("en", endpoint="not a url")


def test_retry_after_parsing():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert 25 <= parse_retry_after(formatdate(now + 30, usegmt=True), now=now) <= 30
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_whole_articles_one_page_per_request(server):
    batch = recorded("action_random_batch2.json")
    pages = batch["query"]["pages"]
    for p in pages:
        server.script(ACTION, Reply(200, {**batch, "query": {"pages": [p]}}))
    with client(server, intro_only=False) as wiki:
        arts, _ = wiki.fetch(3, {})
    assert [a.title for a in arts] == ["Mitochondrion", "Great Barrier Reef", "Kakapo"]
    hits = server.hits(ACTION)
    assert len(hits) == 3 and all(h.param("grnlimit") == "1" and h.param("exintro") is None for h in hits)
