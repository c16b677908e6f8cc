"""The ingress's edges: the body cap counted as the body streams in, X-Forwarded-For believed only
from trusted proxies (on real Ray Serve, whose proxy would otherwise rewrite the client from it),
and the dashboard behind an API key in a real browser."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from selflearn.feedback import client_hash
from selflearn.serving.config import ServeSettings
from tests.support.engine import serve_api

CAP = 64 * 1024
KEY = "edge-key-0123456789"
MB = 2**20


class BodyCounter:
    """ASGI wrapper: the request body bytes the app asked for (what it could ever have held)."""

    def __init__(self, app):
        self.app, self.bytes = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                self.bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@contextlib.contextmanager
def served(app) -> Iterator[str]:
    """`app` over real HTTP (uvicorn in a thread). Like Serve's proxy (serving/deployment.py:
    PROXY_ENV), uvicorn leaves the client address alone: the app decides whom to believe."""
    with serve_api(app, proxy_headers=False) as url:
        yield url


def api(tmp_path: Path, **settings):
    from selflearn.serving.http import build_api

    base = {"max_body_bytes": CAP, "feedback_uri": f"file://{tmp_path / 'feedback'}"}
    return build_api(None, ServeSettings.model_validate({**base, **settings}))


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def feedback_docs(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*.json"))]


# -- the body cap -------------------------------------------------------------------------------------
def test_a_chunked_100_mb_body_is_413_and_never_held(tmp_path):
    counter = BodyCounter(api(tmp_path))
    sent = 0

    def body() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        nonlocal sent
        chunk = b'{"message": "' + b"a" * (MB - 13)
        for _ in range(100):
            sent += len(chunk)
            yield chunk
            chunk = b"a" * MB

    with served(counter) as url:
        before = rss()
        r = httpx.post(f"{url}/chat", content=body(), headers={"Content-Type": "application/json"}, timeout=60)
        grown = rss() - before
        assert r.status_code == 413, r.text
        assert r.json()["error"] == {"message": f"request body over {CAP} bytes", "type": "invalid_request_error",
                                     "param": None, "code": "body_too_large"}
        # The app stopped reading one chunk past the cap, and the server the connection soon after.
        assert CAP < counter.bytes <= CAP + 256 * 1024  # asyncio reads a socket 256 KiB at a time
        assert sent < 32 * MB
        assert grown < 40 * MB, f"the server grew by {grown / MB:.0f} MB"
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'selflearn_http_requests_total{code="413",route="/chat"} 1.0' in metrics


def test_a_body_longer_than_its_content_length_is_413(tmp_path):
    """HTTP/1.1 servers cut a body at its Content-Length (uvicorn does), so this is the ASGI contract
    itself: a server that hands over more than the header said still gets a 413, after one chunk
    past the cap."""
    import asyncio

    app = api(tmp_path)
    chunk, pulled, sent = b"a" * 16384, [], []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/chat", "raw_path": b"/chat", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}

    async def receive():
        if len(pulled) >= 1000:  # 16 MB: a server that never stops
            return {"type": "http.disconnect"}
        pulled.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["code"] == "body_too_large"
    assert len(pulled) == CAP // len(chunk) + 1
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]  # nothing after ours


def test_bodies_within_the_cap_are_untouched(tmp_path):
    with served(api(tmp_path)) as url, httpx.Client(base_url=url, timeout=30) as http:
        # A chunked body under the cap reaches its route whole.
        doc = json.dumps({"rating": "up", "conversation_id": "c1", "comment": "x" * 1900}).encode()
        r = http.post("/feedback", content=iter([doc[:1000], doc[1000:]]),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text
        assert feedback_docs(tmp_path / "feedback")[0]["comment"] == "x" * 1900
        # Just under the cap: read and validated as usual (the message is over max_message_chars).
        r = http.post("/chat", json={"message": "a" * (CAP - 100)})
        assert r.status_code == 422 and r.json()["error"]["param"] == "message", r.text
        # An honest Content-Length over the cap: refused before the body is read.
        r = http.post("/chat", json={"message": "a" * CAP})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


# -- whose X-Forwarded-For is believed ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_backend(tiny_opt_dir):
    from selflearn.serving.backend import EngineBackend
    from selflearn.serving.config import EngineOptions
    from selflearn.serving.engine import Engine

    engine = Engine(EngineOptions(dtype="fp32", torch_threads=1, max_batch_size=1, max_queue=4,
                                  max_context_tokens=256, max_new_tokens_cap=8))
    engine.configure({"base_model": tiny_opt_dir}, wait=True)
    yield EngineBackend(engine)
    engine.shutdown()


def ask(http: httpx.Client, forwarded_for: str, i: int) -> tuple[int, int]:
    """(status of /chat, status of /feedback) for one client's turn behind `forwarded_for`."""
    headers = {"X-Forwarded-For": forwarded_for}
    chat = http.post("/chat", json={"message": "hi", "max_length": 1}, headers=headers)
    note = http.post("/feedback", json={"rating": "up", "conversation_id": f"c{i}"}, headers=headers)
    return chat.status_code, note.status_code


def test_forwarded_for_counts_only_from_trusted_proxies(tmp_path, tiny_backend):
    """From an untrusted peer a new X-Forwarded-For per request is still one client; a listed
    proxy's header names the client (the nearest hop that is not a trusted proxy)."""
    from selflearn.serving.http import build_api

    def app(name: str, **extra):
        return build_api(tiny_backend, ServeSettings.model_validate(
            {"rate_limit_per_minute": 6, "rate_limit_burst": 2, "feedback_uri": f"file://{tmp_path / name}", **extra}))

    with served(app("open")) as url, httpx.Client(base_url=url, timeout=60) as http:
        turns = [ask(http, f"203.0.113.{i}", i) for i in range(3)]
        assert [chat for chat, _ in turns] == [200, 200, 429]
        assert {note for _, note in turns} == {201}
        assert {d["client"] for d in feedback_docs(tmp_path / "open")} == {client_hash("127.0.0.1")}
    with served(app("proxied", trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"])) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        # The client forged the first hop; the trusted proxy 10.1.1.1 appended the address it saw.
        turns = [ask(http, f"6.6.6.6, 198.51.100.{i}, 10.1.1.1", i) for i in range(3)]
        assert turns == [(200, 201)] * 3  # three clients, each within its burst
        clients = {d["client"] for d in feedback_docs(tmp_path / "proxied")}
        assert clients == {client_hash(f"198.51.100.{i}") for i in range(3)}


def test_trusted_proxies_must_be_addresses():
    from selflearn.serving.config import parse_settings

    with pytest.raises(ValueError, match="'proxy.local' is not an IP address or CIDR network"):
        parse_settings({"trusted_proxies": ["10.0.0.0/8", "proxy.local"]})


def test_serve_proxy_keeps_the_peer_and_caps_bodies_on_real_serve(srv, tmp_path, tiny_opt_dir):
    """Through Ray Serve's own HTTP proxy: requests from 127.0.0.1, each with a new X-Forwarded-For,
    are one client for the rate limit and the feedback record when trust is off (the default).
    (trust_forwarded_for still believes it from anyone: tests/test_serving_app.py's rate limit tests.)
    A chunked body over the cap is a 413 there too."""
    from selflearn.serving.app import application, deploy

    args = {"rate_limit_per_minute": 6, "rate_limit_burst": 3, "max_body_bytes": CAP,
            "feedback_uri": f"file://{tmp_path / 'feedback'}",
            "engine": {"max_batch_size": 1, "max_queue": 4, "max_new_tokens_cap": 8, "torch_threads": 1}}
    edge = application(app_name="edge", route_prefix="/edge", user_config={"base_model": tiny_opt_dir}, args=args)
    config = srv.server.config
    deploy({**config, "applications": [*config["applications"], edge]}, timeout=300)
    try:
        with httpx.Client(base_url=srv.url + "/edge", timeout=60) as http:
            turns = [ask(http, f"203.0.113.{i}", i) for i in range(4)]
            assert [chat for chat, _ in turns] == [200, 200, 200, 429]
            assert {note for _, note in turns} == {201}
            assert {d["client"] for d in feedback_docs(tmp_path / "feedback")} == {client_hash("127.0.0.1")}
            r = http.post("/chat", content=iter([b'{"message": "'] + [b"a" * 32768] * 64),
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    finally:
        deploy(config)  # the shared server as it was


# -- the dashboard behind a key -----------------------------------------------------------------------

def test_dashboard_asks_for_the_key_and_sends_it(tmp_path, page):
    from playwright.sync_api import expect

    from selflearn.local.serving import web_dir

    state = tmp_path / "state.json"
    state.write_text(json.dumps({"run": "local", "phase": "idle", "serving_id": "local/r000002",
                                 "rounds": [{"round": 2, "status": "published", "promoted": True,
                                             "id": "local/r000002", "reason": "promoted: ok"}]}))
    app = api(tmp_path, api_key=KEY, state_file=str(state), dashboard_dir=str(web_dir()))
    with served(app) as url:
        assert httpx.get(f"{url}/api/rounds", timeout=10).status_code == 401
        assert httpx.get(f"{url}/api/rounds", headers={"X-API-Key": KEY}, timeout=10).json()["run"] == "local"

        page.goto(f"{url}/dashboard/")
        expect(page.locator("#error")).to_contain_text("needs an API key", timeout=10_000)
        expect(page.locator("#key-box")).to_be_visible()
        page.fill("#api-key", "wrong")
        page.locator("#api-key").blur()  # `change`: the dashboard asks again at once
        expect(page.locator("#error")).to_contain_text("the API key is wrong", timeout=10_000)
        page.fill("#api-key", KEY)
        page.locator("#api-key").blur()
        expect(page.locator("#serving")).to_have_text("local/r000002", timeout=10_000)
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#rounds tr").first).to_contain_text("promoted")

        page.reload()  # the key is kept
        expect(page.locator("#serving")).to_have_text("local/r000002", timeout=10_000)
        expect(page.locator("#error")).to_be_hidden()
        page.goto(f"{url}/")  # and it is the chat page's key too (one origin, one saved key)
        expect(page.locator("#api-key")).to_have_value(KEY, timeout=10_000)
