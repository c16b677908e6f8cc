"""A replica told to serve weights that fail to load, and an API key variable that holds no key.

The engine without Ray (what a Serve replica runs), checkpoints on a file:// store whose manifest
was tampered with after publishing, and the HTTP API in-process (uvicorn on 127.0.0.1).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from selflearn.checkpoints import sha256_file
from selflearn.contracts import EngineStatus
from selflearn.serving.config import EngineOptions, ServeSettings, api_key_of, parse_settings
from selflearn.serving.engine import Engine, NotReady
from tests.support.engine import ask, serve_api, submit
from tests.support.tampered import tampered_checkpoint, traversal, wrong_sha256
from tests.support.waiting import wait_until


@contextmanager
def engine(**options) -> Iterator[Engine]:
    eng = Engine(EngineOptions(dtype="fp32", torch_threads=1, max_context_tokens=256, max_new_tokens_cap=16,
                               **options))
    try:
        yield eng
    finally:
        eng.shutdown()


@contextmanager
def api(eng: Engine, workdir: Path, **settings) -> Iterator[str]:
    """The HTTP API over `eng` on a free port; its base URL."""
    from selflearn.serving.backend import EngineBackend
    from selflearn.serving.http import build_api

    with serve_api(build_api(EngineBackend(eng), ServeSettings(feedback_uri=f"file://{workdir / 'feedback'}",
                                                               **settings))) as url:
        yield url


def test_nothing_loaded_stays_unready_says_why_and_recovers(tiny_opt_dir, tmp_path):
    """No silent base model: not ready (/readyz 503), degraded with the reason, healthy to Serve (a
    new replica would fail the same way), and the load is retried until the store is mended."""
    uri = tampered_checkpoint(tmp_path, tiny_opt_dir, wrong_sha256)
    with engine() as eng:
        eng.RETRY_FIRST_S = 0.0  # each health check may retry: the backoff's wait is not what is tested
        assert eng.configure({"checkpoint": uri, "base_model": tiny_opt_dir}, wait=True)
        st = eng.status().weights
        assert not st.ready and st.checkpoint is None
        assert st.degraded and st.degraded_reason.startswith(f"loading {uri} failed: CheckpointError: ")
        assert "model.safetensors: sha256 mismatch" in st.degraded_reason
        with pytest.raises(NotReady, match="failed to load"):
            submit(eng, ask("hi"))
        eng.check_health()
        with api(eng, tmp_path) as url:
            r = httpx.get(f"{url}/readyz", timeout=10)
            assert r.status_code == 503, r.text
            assert r.json() == {"ready": False, "checkpoint": None, "degraded": True,
                                "degraded_reason": st.degraded_reason, "loading": None}
            # /status: the engine's own status, whole, in the documented flat shape.
            model = httpx.get(f"{url}/status", timeout=10).json()["model"]
            assert EngineStatus.parse(model).weights == st and model["last_swap_error"] == st.degraded_reason
            assert httpx.post(f"{url}/chat", json={"message": "hi", "max_length": 2}, timeout=10).status_code == 503

            manifest = tmp_path / "store" / "run" / "r000001" / "manifest.json"
            doc = json.loads(manifest.read_text())
            doc["files"]["model.safetensors"]["sha256"] = sha256_file(manifest.parent / "model.safetensors")
            manifest.write_text(json.dumps(doc))

            def recovered() -> bool:
                eng.check_health()  # what Serve calls every 10 s; it starts the retry when due
                return eng.status().weights.ready

            wait_until(recovered, timeout=120, what="the retried load", interval=0.2)
            st = eng.status().weights
            assert st.checkpoint == "run/r000001" and not st.degraded and st.degraded_reason is None
            # /readyz reads a status at most half a second old.
            r = wait_until(lambda: (r := httpx.get(f"{url}/readyz", timeout=10)).status_code == 200 and r,
                           timeout=10, what="/readyz to answer 200")
            assert r.json()["checkpoint"] == "run/r000001" and not r.json()["degraded"]


def test_weights_in_place_keep_serving_and_say_why(tiny_opt_dir, tmp_path):
    uri = tampered_checkpoint(tmp_path, tiny_opt_dir, wrong_sha256)
    base = f"base:{tiny_opt_dir}"
    with engine() as eng:
        eng.configure({"base_model": tiny_opt_dir}, wait=True)
        eng.configure({"checkpoint": uri, "base_model": tiny_opt_dir}, wait=True)
        st = eng.status().weights
        assert st.ready and st.checkpoint == base
        assert st.degraded and "sha256 mismatch" in st.degraded_reason and uri in st.degraded_reason
        eng.check_health()
        with api(eng, tmp_path) as url:
            r = httpx.get(f"{url}/readyz", timeout=10)
            assert r.status_code == 200 and r.json()["degraded"] and "sha256" in r.json()["degraded_reason"]
            chat = httpx.post(f"{url}/chat", json={"message": "hi", "max_length": 2}, timeout=60)
            assert chat.status_code == 200 and chat.headers["x-model-checkpoint"] == base
        # Asked for what it serves again: no longer degraded.
        eng.configure({"base_model": tiny_opt_dir}, wait=True)
        st = eng.status().weights
        assert not st.degraded and st.degraded_reason is None


@pytest.mark.parametrize("edit, words", [(wrong_sha256, "sha256 mismatch"), (traversal, "unsafe path")])
def test_allow_base_fallback_serves_the_base_model_marked_degraded(tiny_opt_dir, tmp_path, edit, words):
    uri = tampered_checkpoint(tmp_path, tiny_opt_dir, edit)
    with engine(allow_base_fallback=True) as eng:
        eng.configure({"checkpoint": uri, "base_model": tiny_opt_dir}, wait=True)
        st = eng.status().weights
        assert st.ready and st.checkpoint == f"base:{tiny_opt_dir}"
        assert st.degraded and words in st.degraded_reason
        assert st.degraded_reason.endswith(f"; serving base:{tiny_opt_dir} instead")


def test_api_key_of_a_named_variable_must_hold_a_key():
    assert api_key_of(ServeSettings(), {}) is None
    assert api_key_of(ServeSettings(), {"SELFLEARN_API_KEY": "k1\n"}) == "k1"
    assert api_key_of(ServeSettings(api_key_env="MY_KEY"), {"MY_KEY": "k2", "SELFLEARN_API_KEY": "k1"}) == "k2"
    assert api_key_of(ServeSettings(api_key="k3", api_key_env="MY_KEY"), {}) == "k3"
    for settings, environ, message in [
        (ServeSettings(api_key_env="MY_KEY"), {}, "api_key_env MY_KEY: the variable MY_KEY is not set"),
        (ServeSettings(api_key_env="MY_KEY"), {"MY_KEY": ""}, "api_key_env MY_KEY: the variable MY_KEY is empty"),
        # What the chart's Secret wiring writes: named explicitly, so required even though it is the default.
        (ServeSettings(api_key_env="SELFLEARN_API_KEY"), {}, "the variable SELFLEARN_API_KEY is not set"),
        (ServeSettings(), {"SELFLEARN_API_KEY": " "}, "SELFLEARN_API_KEY is set but empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            api_key_of(settings, environ)
    for args, message in [({"api_key": ""}, "api_key is empty"), ({"api_key_env": " "}, "api_key_env is empty")]:
        with pytest.raises(ValueError, match=message):
            parse_settings(args)


def test_the_ingress_refuses_a_named_variable_without_a_key_and_says_auth_off(tmp_path, monkeypatch, caplog):
    """The ingress replica builds the API: a named, unset variable fails its start with one line
    (Serve reports it as the deployment's error); no key at all is logged as auth off."""
    from selflearn.serving.http import build_api

    monkeypatch.delenv("SELFLEARN_API_KEY", raising=False)
    monkeypatch.delenv("CHAT_KEY", raising=False)
    feedback = f"file://{tmp_path / 'feedback'}"
    with pytest.raises(ValueError, match="api_key_env CHAT_KEY: the variable CHAT_KEY is not set"):
        build_api(None, ServeSettings(api_key_env="CHAT_KEY", feedback_uri=feedback))
    with caplog.at_level(logging.WARNING, logger="selflearn.serving.http.service"):
        build_api(None, ServeSettings(feedback_uri=feedback))
    assert any(r.getMessage().startswith("auth off: no API key configured") for r in caplog.records)


def test_local_mode_refuses_a_promoted_checkpoint_that_fails_verification(tiny_opt_dir, tmp_path):
    """`selflearn local` serves the promoted (here: pinned) checkpoint at start: one line, exit 2,
    before Ray starts."""
    uri = tampered_checkpoint(tmp_path, tiny_opt_dir, wrong_sha256)
    env = {**os.environ, "SELFLEARN_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "selflearn.cli", "local", "--rounds", "0", "--port", "1",
                        "--data-dir", str(tmp_path / "data"), "--store", f"file://{tmp_path / 'store'}",
                        "--pin", uri, "--model", tiny_opt_dir, "--no-feedback"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"selflearn local: error: checkpoint failed verification: {uri}/model.safetensors: sha256 mismatch (file "
        f"{sha256_file(tmp_path / 'store' / 'run' / 'r000001' / 'model.safetensors')[:12]}, manifest 000000000000); "
        "refusing to load (--allow-degraded serves the base model instead, marked degraded)"]
