"""`selflearn serve` as a user runs it: a subprocess with its own local Ray, real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from conftest import free_port

CLI = [sys.executable, "-m", "selflearn.cli", "serve"]


def test_bad_checkpoint_is_one_clear_line(tmp_path):
    for arg, words in [(f"file://{tmp_path}/run/r000001", "does not exist"),
                       ("http://example.com/run/r000001", "not a checkpoint uri")]:
        r = subprocess.run(CLI + ["--checkpoint", arg, "--port", "1"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr


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
    assert f"serving base:{tiny_opt_dir}" in out


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
