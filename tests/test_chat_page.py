"""The chat page in real headless Chromium (Debian's, driven by playwright) against real Ray Serve."""

from __future__ import annotations

import shutil
import time

import pytest


pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page(tmp_path):
    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (bash hack/test-deps.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A persistent context is how playwright takes a fresh --user-data-dir of our choosing.
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=FLAGS)
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


def test_typed_message_streams_an_answer_with_its_checkpoint(srv, page):
    from playwright.sync_api import expect

    page.goto(srv.url + "/")
    expect(page.locator("#served")).to_contain_text("base:", timeout=30_000)  # the page reads /readyz
    expect(page.locator("#dashboard-link")).to_be_visible(timeout=10_000)  # this server has a dashboard
    page.fill("#max_length", "24")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    page.fill("#message", "Write three sentences about the sea. <b>bold?</b>")
    page.click("#send")

    # Text must show up while the answer is still streaming, not only at the end.
    reply = page.locator(".msg.assistant .text").last
    seen_partial = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        streaming = page.locator(".msg.assistant.streaming").count() > 0
        if streaming and reply.text_content():
            seen_partial = True
        if not streaming:
            break
        time.sleep(0.02)
    assert seen_partial, "no text appeared before the answer finished"
    assert reply.text_content().strip()
    meta = page.locator(".msg.assistant .meta .checkpoint").last
    assert meta.text_content() == "base:embedded:smollm2-135m-instruct"
    assert "base:embedded:smollm2-135m-instruct" in page.text_content("#served")
    assert page.is_hidden("#error")
    # Everything is text: the user's markup is shown, not rendered.
    assert "<b>bold?</b>" in page.locator(".msg.user .text").last.text_content()
    assert page.locator(".msg b").count() == 0

    # Feedback from the page lands in the store.
    page.locator(".msg.assistant .meta button", has_text="👍").last.click()
    expect(page.locator(".meta button[aria-pressed='true']")).to_have_count(1, timeout=30_000)
    assert any(srv.feedback_dir.glob("*/*.json"))
