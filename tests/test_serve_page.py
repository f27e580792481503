"""The chat page in a real headless browser (Debian's chromium driven by Playwright): type a message, see
the reply stream in, reset."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")

from test_serve import make_app, oracle, require_program, running_server, serve_model  # noqa: E402,F401

from blenderbot_mb.serve import SQLiteStore  # noqa: E402

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
# records every text the bot's bubbles show, so the test sees the reply arrive piece by piece
RECORD_UPDATES = """
window.botTexts = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('.msg.bot');
  if (bubbles.length) window.botTexts.push(bubbles[bubbles.length - 1].textContent);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = require_program("chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield browser
        browser.close()


def test_chat_page(serve_model, oracle, browser, tmp_path):
    app = make_app(serve_model, SQLiteStore(str(tmp_path / "c.sqlite3")))
    store = app.state.store
    with running_server(app) as url:
        page = browser.new_page()
        page.add_init_script(RECORD_UPDATES)
        page.goto(url)
        page.click("summary")
        page.fill("#persona", "I love cats.")
        page.select_option("#decoding", "greedy")  # token by token, whatever the model's beams do
        page.fill("#message", "Do you have any pets?")
        page.click("#send")
        page.wait_for_selector(".msg.bot.done", timeout=30000)
        history = [{"role": "system", "content": "I love cats."}, {"role": "user", "content": "Do you have any pets?"}]
        reply = oracle(history, num_beams=1, do_sample=False)
        assert page.inner_text(".msg.bot.done") == reply.strip()
        shown = [t for t in page.evaluate("window.botTexts") if t]
        assert len(set(shown)) > 1 and all(reply.strip().startswith(t) for t in shown)  # streamed in pieces
        conversation = page.evaluate("localStorage.getItem('blenderbot-mb-conversation')")
        assert store.get(conversation)["messages"] == [*history, {"role": "assistant", "content": reply}]

        page.select_option("#decoding", "default")  # the model's beam search from here on
        page.fill("#message", "What is your favorite food?")
        page.press("#message", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.bot.done').length == 2", timeout=30000)
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "What is your favorite food?"}]
        assert page.inner_text(".msg.bot.done >> nth=1") == oracle(history).strip()

        page.click("#reset")
        page.wait_for_function("document.querySelectorAll('.msg').length == 0")
        assert page.evaluate("localStorage.getItem('blenderbot-mb-conversation')") is None
        page.wait_for_function(f"fetch('/v1/conversations/{conversation}').then(r => r.status == 404)")
        assert store.get(conversation) is None
        page.fill("#message", "Hi!")
        page.click("#send")
        page.wait_for_selector(".msg.bot.done", timeout=30000)
        assert page.inner_text(".msg.bot.done") == oracle([{"role": "system", "content": "I love cats."},
                                                           {"role": "user", "content": "Hi!"}]).strip()
        assert page.evaluate("localStorage.getItem('blenderbot-mb-conversation')") != conversation

        # the conversation deleted on the server (another tab, an expiry): its turns leave the page, a new one starts
        deleted = page.evaluate("localStorage.getItem('blenderbot-mb-conversation')")
        assert store.delete(deleted)
        page.fill("#message", "Hello!")
        page.click("#send")
        # (not the first .msg.bot.done: the previous turn's is one until the page clears it)
        page.wait_for_function("[...document.querySelectorAll('.msg')].map(n => n.className).join('|') == "
                               "'msg notice|msg persona|msg user|msg bot done'", timeout=30000)
        assert page.inner_text(".msg.bot.done") == oracle([{"role": "system", "content": "I love cats."},
                                                           {"role": "user", "content": "Hello!"}]).strip()
        assert page.evaluate("localStorage.getItem('blenderbot-mb-conversation')") not in (deleted, None)
        page.close()
    app.state.engine.stop()
