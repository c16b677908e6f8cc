"""The chat page in real headless Chromium (Debian's, driven by playwright) against real Ray Serve."""

from __future__ import annotations

import json
import time



def test_typed_message_streams_an_answer_with_its_checkpoint(srv, page):
    from playwright.sync_api import expect

    page.goto(srv.url + "/")
    expect(page.locator("#served")).to_contain_text("base:", timeout=30_000)  # the page reads /readyz
    expect(page.locator("#dashboard-link")).to_be_visible(timeout=10_000)  # this server has a dashboard
    page.fill("#max_length", "96")  # long enough to be caught streaming on the fast (OpenVINO) engine
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

    # Feedback from the page lands in the store, with the answer it judges, and the page says
    # when it will be learned. A 👎 asks for a correction.
    page.locator(".msg.assistant .meta button", has_text="👍").last.click()
    expect(page.locator(".meta .thanks, #error:not([hidden])")).to_have_count(1, timeout=30_000)
    assert page.is_hidden("#error"), page.text_content("#error")
    expect(page.locator(".meta button[aria-pressed='true']")).to_have_count(1, timeout=30_000)
    expect(page.locator(".meta .thanks").last).to_contain_text("learned in the next training round")
    page.once("dialog", lambda d: d.accept("The sea covers most of the Earth."))
    page.locator(".msg.assistant .meta button", has_text="👎").last.click()
    expect(page.locator(".meta button[aria-pressed='true']")).to_have_count(2, timeout=30_000)
    docs = [json.loads(f.read_text()) for f in srv.feedback_dir.glob("*/*.json")]
    mine = [d for d in docs if d.get("prompt", "").startswith("Write three sentences about the sea.")]
    assert {d["rating"] for d in mine} == {"up", "down"} and all(d["matched"] for d in mine)
    assert any(d.get("correction") == "The sea covers most of the Earth." for d in mine)
    assert all(d["reply"] == reply.text_content() for d in mine)


def test_dashboard_shows_knowledge_chat_health_examples_and_the_live_round(page, tmp_path):
    """The dashboard page in a real browser over real HTTP, fed the state a local run writes."""
    import json
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from playwright.sync_api import expect

    from selflearn.local.serving import web_dir
    from selflearn.serving.http.chat_routes import WEB

    state = {
        "run": "local", "phase": "training", "serving_id": "local/r000001", "rounds": [{
            "round": 1, "status": "published", "promoted": True, "id": "local/r000001", "losses": [2.5, 2.1],
            "reason": "promoted: format 100%; chat retention 0.971; knowledge 0.202->0.391",
            "knowledge": {"learned": {"before": 0.202, "after": 0.391}, "held_out": {"before": 0.21, "after": 0.2}},
            "chat": {"retention": 0.971, "format_ok": {"before": 1.0, "after": 1.0}},
            "feedback": {"corrections": 3, "ratings": 0, "ids": ["a1b2", "c3d4", "e5f6"]},
            "examples": [{"question": "What is Chard?", "parent": "Chard is a type of edible <b>mushroom</b>.",
                          "candidate": "Chard is a leafy green vegetable.", "parent_score": 0.0,
                          "candidate_score": 1.0}]}],
        "current_round": {"round": 2, "started_at": time.time() - 30, "losses": [2.3, 2.0, 1.8],
                          "progress": {"phase": "training", "step": 3, "of": 18, "loss": 1.8, "tokens_per_s": 270,
                                       "eta_s": 55}},
    }
    root = tmp_path / "site"
    (root / "api").mkdir(parents=True)
    (root / "dashboard").symlink_to(web_dir())
    (root / "static").symlink_to(WEB)  # the chat page's scripts (key.js), which the same server serves
    (root / "api" / "rounds").write_text(json.dumps(state))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{server.server_port}/dashboard/index.html")
        expect(page.locator("#training")).to_contain_text("step 3/18, loss 1.800, 270 tok/s, ETA 55s", timeout=10_000)
        row = page.locator("#rounds tr").first
        expect(row).to_contain_text("0.20 → 0.39")
        expect(row).to_contain_text("0.971")
        expect(row).to_contain_text("100%")
        fb = row.locator("td.feedback")
        expect(fb).to_have_text("3 corrections, 0 ratings")
        assert fb.get_attribute("title") == "learned: a1b2, c3d4, e5f6"  # which round learned your feedback
        examples = page.locator("#examples")
        expect(examples).to_contain_text("Chard is a leafy green vegetable. (1.00)")
        expect(examples).to_contain_text("<b>mushroom</b>")  # shown as text, never as markup
        assert page.locator("#examples b").count() == 0
        assert "no training steps yet" not in page.locator("#loss").inner_html()  # the live round's steps
    finally:
        server.shutdown()
