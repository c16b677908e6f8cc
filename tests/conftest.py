"""Shared fixtures: the real embedded model, a real S3 API server on 127.0.0.1, tiny random models
(OPT, and a Llama with the embedded model's tokenizer and chat template), and one real learning
round on the embedded model shared by every test that only reads its result.

Tiers (docs/testing.md): `make test` runs `pytest -m "not full"`; `make test-all` adds the tests
marked `full` (multi-round learning and the gate's bad rounds on the real model, feedback rounds)
and the container end to end.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Rounds in tests are a few steps on a cold compile cache, where compiling costs more than it
# saves; tests/test_train_loop.py checks the compiled path against the eager one explicitly.
os.environ.setdefault("SELFLEARN_COMPILE", "off")

REPO = Path(__file__).resolve().parents[1]
# Test support is imported as `tests.support.*`, as bench/ and tests/e2e_docker/ import it, also when
# pytest runs as `.venv/bin/pytest` (which, unlike `python -m pytest`, leaves the repository root off sys.path).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


def pytest_collection_modifyitems(config, items):
    """Modules that run Ray and Serve of their own (`OWNS_RAY = True`) retire the shared instance
    (tests/support/serving.py): they run last, so that the shared one starts once a session."""
    items.sort(key=lambda item: bool(getattr(getattr(item, "module", None), "OWNS_RAY", False)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """HF-format directory of the bundled SmolLM2-135M-Instruct (materialised once)."""
    from selflearn import basemodel

    return basemodel.resolve("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API over real HTTP on 127.0.0.1; yields (endpoint, make_bucket)."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"

    def make_bucket(name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    yield endpoint, make_bucket
    server.stop()


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> str:
    """A tiny randomly initialised OPT saved locally, to prove the OPT path without a hub."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from selflearn import basemodel

    d = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=256, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
    OPTForCausalLM(cfg).save_pretrained(d)
    # Reuse the embedded model's tokenizer files (vocab 49152) without its chat template, as OPT has none.
    tok = basemodel.load_tokenizer(basemodel.resolve("embedded:smollm2-135m-instruct"))
    tok.chat_template = None
    tok.save_pretrained(d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_model_dir) -> str:
    """A tiny randomly initialised Llama with the embedded model's tokenizer and chat template: the
    same architecture and prompt path as the real model, for tests of logic (the driver, manifests,
    promotion wiring) where what an answer says does not matter. A round on it takes seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selflearn import basemodel

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    basemodel.load_tokenizer(embedded_model_dir).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def learned_round(tmp_path_factory, s3_server, embedded_model_dir):
    """One real round on the embedded model, published to S3 (moto), with the chat evaluation the
    gate reads: built once, read by every test that asks what a normal round learned and published
    (tests/support/rounds.py)."""
    from tests.support import rounds

    endpoint, make_bucket = s3_server
    make_bucket("learned")
    return rounds.learn_one_round(uri="s3://learned/runs", endpoint=endpoint,
                                  workdir=tmp_path_factory.mktemp("learned-round"))


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page(tmp_path):
    """A page in real headless Chromium (Debian's, driven by playwright), in a fresh profile."""
    if not shutil.which("chromium") and not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (bash hack/test-deps.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A persistent context is how playwright takes a fresh --user-data-dir of our choosing.
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_FLAGS)
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


@pytest.fixture(scope="module")
def srv(tiny_opt_dir, tmp_path_factory):
    """The process's one shared Serve instance (tests/support/serving.py), started on first use.

    Module-scoped on purpose: a module that needs Serve to itself (the one-machine driver's tests)
    calls `testing.stop_shared()` first, and the next module that asks for `srv` starts a fresh one
    instead of being handed a server whose Ray is gone.
    """
    from tests.support import serving as testing

    return testing.shared_server(tiny_model_dir=tiny_opt_dir, workdir=tmp_path_factory.mktemp("serving"),
                                 port=free_port())


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_serve_at_exit():
    yield
    from tests.support import serving as testing

    testing.stop_shared()
