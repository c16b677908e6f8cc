"""`selflearn operator` as a user starts it: a separate process, a kubeconfig, Ctrl-C to stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.support.operator import Cluster, EmulatorThread, eventually

REPO = Path(__file__).resolve().parents[1]


def test_selflearn_operator_runs_against_a_kubeconfig(tmp_path: Path):
    api = EmulatorThread().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": api.url}}],
        "users": [{"name": "dev", "user": {"token": "dev-token"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "dev", "namespace": "default"}}],
    }))
    proc = subprocess.Popen(
        # Cluster-wide, the default (kmock cannot list namespaces, which watching `-n` patterns needs).
        [sys.executable, "-m", "selflearn.cli", "operator", "--kubeconfig", str(kubeconfig), "--standalone",
         "--tick", "0.2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def scenario() -> None:
        c = Cluster(api)
        try:
            await c.create_learnerrun("cli", {"schedule": {"intervalSeconds": 0}, "storage": {"uri": "s3://b/p"}})
            await eventually(lambda: "cli-r1" in c.jobs("cli"), timeout=60, what="Job cli-r1")
            # Requests carried the kubeconfig's credentials.
            assert "Bearer dev-token" in api.call(lambda: set(api.emulator.authorizations))
        finally:
            await c.close()

    try:
        asyncio.run(scenario())
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-2000:]
        assert "Timer 'reconcile' succeeded" not in out  # one line per run per tick would drown the log
    finally:
        if proc.poll() is None:
            proc.kill()
        api.stop()


def test_bad_credentials_are_one_clear_line(tmp_path: Path):
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "selflearn.cli", "operator", "--kubeconfig", str(tmp_path / "none")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "cannot load Kubernetes credentials" in run.stderr
    assert "Traceback" not in run.stderr and time.monotonic() - started < 60
