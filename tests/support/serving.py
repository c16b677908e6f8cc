"""Test support: one real local Serve instance per test process, shared by every test module.

Imported as `tests.support.serving` (from the repository root, which tests/conftest.py puts on
sys.path).

Starting Ray, Serve and the model takes tens of seconds on a small machine, so the serving tests
share one instance with two applications, deployed as one declarative config, as `start_local`
deploys its one (the package's public pieces: `serve_config`, `application`, `deploy`, `LocalServe`):

* `selflearn` at `/`: the embedded model, open (no key), feedback to a temporary file store, CORS for
  one origin, and the one-machine driver's pages (a dashboard directory and a run state file). The
  hot-swap tests reconfigure this one.
* `secure` at `/secure`: a tiny random OPT (the no-chat-template path), API key, a small rate
  limit keyed on X-Forwarded-For, a blocklist, and a one-slot engine with a one-deep queue.

A session fixture in each module calls `shared_server(...)`; the first call starts it, later ones
reuse it, and `stop_shared()` (idempotent) tears it down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from selflearn.serving.app import LocalServe

API_KEY = "test-key-0123456789"
SECURE_PREFIX = "/secure"


@dataclass
class SharedServer:
    server: LocalServe
    url: str
    secure_url: str
    workdir: Path
    store_uri: str

    @property
    def feedback_dir(self) -> Path:
        return self.workdir / "feedback"


_shared: SharedServer | None = None


def shared_server(*, tiny_model_dir: str, workdir: Path, port: int) -> SharedServer:
    global _shared
    if _shared is not None:
        return _shared
    import ray

    from selflearn.serving.app import LocalServe, application, deploy, serve_config

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="selflearn-tests")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "dashboard").mkdir(exist_ok=True)
    (workdir / "dashboard" / "index.html").write_text("<!doctype html><title>dashboard</title>")
    (workdir / "state.json").write_text(json.dumps({"run": "local", "rounds": [{"round": 1}]}))
    main_args = {"feedback_uri": f"file://{workdir / 'feedback'}", "cors_origins": ["http://allowed.example"],
                 "max_message_chars": 2000, "history_turns": 4, "max_body_bytes": 65536,
                 "dashboard_dir": str(workdir / "dashboard"), "state_file": str(workdir / "state.json"),
                 # Every module's feedback comes from 127.0.0.1 here: /feedback's default limit (30 a
                 # minute per client) has its own tests (tests/test_feedback_guard.py).
                 "feedback_rate_limit_per_minute": 0,
                 "engine": {"max_new_tokens_cap": 256, "torch_threads": 2}}
    secure_args = {"api_key": API_KEY, "rate_limit_per_minute": 30, "rate_limit_burst": 3,
                   "trust_forwarded_for": True, "blocklist": ["forbiddenword"], "max_inflight": 3,
                   "feedback_uri": f"file://{workdir / 'feedback-secure'}",
                   "engine": {"max_batch_size": 1, "max_queue": 1, "max_new_tokens_cap": 200, "torch_threads": 1}}
    config = serve_config(port=port, user_config={}, args=main_args)
    config["applications"].append(application(app_name="secure", route_prefix=SECURE_PREFIX, args=secure_args,
                                              user_config={"base_model": tiny_model_dir}))
    deploy(config)
    server = LocalServe(config)
    url = server.url
    wait_until(lambda: _answers(url + "/healthz") and _answers(url + SECURE_PREFIX + "/healthz"), timeout=60,
               what="both applications to answer over HTTP")
    _shared = SharedServer(server=server, url=url, secure_url=url + SECURE_PREFIX, workdir=workdir,
                         store_uri=f"file://{workdir / 'store'}")
    return _shared


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def stop_shared() -> None:
    global _shared
    if _shared is None:
        return
    import ray

    from selflearn.serving.app import shutdown

    _shared = None
    try:
        shutdown()
    finally:
        ray.shutdown()


def parse_sse(text: str) -> list[tuple[str, object]]:
    """[(event, data)] from a text/event-stream body; event is "message" when unnamed."""
    out = []
    for block in text.split("\n\n"):
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            raw = "\n".join(data)
            out.append((event, raw if raw == "[DONE]" else json.loads(raw)))
    return out
