"""`selflearn serve` as a user runs it: a subprocess with its own local Ray, real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from tests.support.tampered import tampered_checkpoint, traversal, wrong_sha256
from tests.support.waiting import wait_until

CLI = [sys.executable, "-m", "selflearn.cli", "serve"]


def refused(args: list[str], tmp_path: Path, **env: str) -> str:
    """Run `selflearn serve ARGS`, which must refuse to start: exit 2 and one line on stderr; that line."""
    environ = {k: v for k, v in os.environ.items() if k != "SELFLEARN_API_KEY"}
    r = subprocess.run(CLI + args + ["--port", "1"], capture_output=True, text=True, timeout=120,
                       env={**environ, "SELFLEARN_CACHE": str(tmp_path / "cache"), **env})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selflearn serve: error: "), r.stderr
    return lines[0]


def test_bad_checkpoint_is_one_clear_line(tmp_path):
    for arg, words in [(f"file://{tmp_path}/run/r000001", "does not exist"),
                       ("http://example.com/run/r000001", "not a checkpoint uri")]:
        r = subprocess.run(CLI + ["--checkpoint", arg, "--port", "1"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("edit, words", [(wrong_sha256, "model.safetensors: sha256 mismatch"),
                                         (traversal, "names an unsafe path '../../../../etc/passwd'")])
def test_a_checkpoint_that_fails_verification_refuses_to_start(tiny_opt_dir, tmp_path, edit, words):
    uri = tampered_checkpoint(tmp_path, tiny_opt_dir, edit)
    line = refused(["--checkpoint", uri], tmp_path)
    assert line.startswith("selflearn serve: error: checkpoint failed verification: ") and words in line
    assert uri in line and "--allow-degraded" in line


@pytest.mark.parametrize("env", [{}, {"CHAT_KEY": ""}, {"CHAT_KEY": "  "}])
def test_an_api_key_variable_without_a_key_refuses_to_start(tmp_path, env):
    line = refused(["--api-key-env", "CHAT_KEY"], tmp_path, **env)
    state = "not set" if not env else "empty"
    assert line == (f"selflearn serve: error: --api-key-env CHAT_KEY: the variable CHAT_KEY is {state}; set it "
                    "to the API key, or leave --api-key-env out to run with auth off")
    # The default variable, set but empty, is no key either (unset, it means auth off).
    assert "SELFLEARN_API_KEY is set but empty" in refused([], tmp_path, SELFLEARN_API_KEY="")


def test_allow_degraded_serves_the_base_model_and_says_so(tiny_opt_dir, tmp_path):
    uri = tampered_checkpoint(tmp_path, tiny_opt_dir, wrong_sha256)
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "SELFLEARN_CACHE": str(tmp_path / "cache")}
    env.pop("SELFLEARN_API_KEY", None)
    proc = subprocess.Popen(CLI + ["--checkpoint", uri, "--base-model", tiny_opt_dir, "--allow-degraded",
                                   "--port", str(port), "--feedback-uri", f"file://{tmp_path / 'feedback'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        line = wait_until(lambda: next((x for x in out if x.startswith("selflearn serve: http")), None)
                          or proc.poll() is not None and "exited", timeout=240, what="the start-up line")
        assert line != "exited", "".join(out)
        assert f"serving base:{tiny_opt_dir} DEGRADED: loading {uri} failed: CheckpointError:" in line
        assert "sha256 mismatch" in line and f"serving base:{tiny_opt_dir} instead" in line
        assert line.rstrip().endswith("auth off: no API key, open to whoever reaches it")
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        body = ready.json()
        assert ready.status_code == 200 and body["ready"] and body["checkpoint"] == f"base:{tiny_opt_dir}"
        assert body["degraded"] and "sha256 mismatch" in body["degraded_reason"]
        status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()["model"]
        assert status["degraded"] and status["degraded_reason"] == body["degraded_reason"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert proc.returncode == 0, "".join(out)


def test_serve_starts_answers_and_stops(tiny_opt_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(CLI + ["--model", tiny_opt_dir, "--port", str(port), "--feedback-uri",
                                   f"file://{tmp_path / 'feedback'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "selflearn serve did not become ready"
            time.sleep(1)
        r = httpx.post(f"{url}/chat", json={"message": "hello", "max_length": 4}, timeout=60)
        assert r.status_code == 200 and r.headers["x-model-checkpoint"] == f"base:{tiny_opt_dir}"
        assert httpx.get(f"{url}/", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert f"serving base:{tiny_opt_dir}; auth off: no API key" in out


def test_serving_without_the_serve_extra_says_how_to_install_it(monkeypatch, capsys):
    """The trainer image and a plain `pip install selflearn` have no Ray: one line, exit 2."""
    from selflearn import cli
    from selflearn.serving import cli as serving_cli

    def no_ray(_args):
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    monkeypatch.setattr(serving_cli, "run", no_ray)
    assert cli.main(["serve", "--checkpoint", "base"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("selflearn serve: error: this needs the serving extra (ray is not installed): "
                   "pip install 'selflearn[serve]'")
