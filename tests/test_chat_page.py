"""serve.py's chat page (static/chat.html) in a real headless Chromium, driven by Playwright:
send, stream, stop, edit and regenerate, reload, and model output shown as text, never HTML.
SERVE_SCREENSHOT=1 saves the page as assets/serving.png (docs/serving.md shows it)."""

import json
import os
import shutil
import time

import pytest
import requests

from conftest import REPO
from test_serve import chat_model, running_server  # noqa: F401 (chat_model is a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y "
                                                         "chromium); .ci/run installs it")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (requirements-test.txt)")


@pytest.fixture(scope="module")
def page_server(chat_model):  # noqa: F811
    # a reply runs until stopped (no stop token before 2,000 tokens), long enough to stop it
    with running_server(chat_model[0], "--min_new_tokens=2000") as running:
        yield running[0]


@pytest.fixture(scope="module")
def page(page_server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.set_default_timeout(20_000)
        page.goto(page_server)
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny-chat')")
        yield page
        browser.close()


# resolves once the reply streaming in shows more than `length` characters while the Stop button
# is up, pressing it then if `stop`: watched in the page, at every change of it, so that a fast
# machine cannot finish the reply between a look from the test and a click
WHILE_STREAMING = """({length, stop}) => new Promise((resolve) => {
    const observer = new MutationObserver(() => {
        const reply = document.querySelector('.message.assistant .content');
        if (reply && reply.textContent.length > length && !document.getElementById('stop').hidden) {
            observer.disconnect();
            if (stop) document.getElementById('stop').click();
            resolve();
        }
    });
    observer.observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
})"""


def assistant_texts(page):
    return page.locator(".message.assistant .content").all_inner_texts()


def test_send_stream_stop_edit_regenerate_and_reload(page, page_server):
    page.fill("#max-tokens", "300")
    page.fill("#temperature", "0")
    page.fill("#input", "Who wrote Hamlet?")
    # the reply streams in: text shows while the stop button is up
    page.evaluate(f"() => {{ document.getElementById('send').click(); return ({WHILE_STREAMING})({{length: 0, stop: false}}); }}")
    page.fill("#max-tokens", "900")  # the next reply runs long enough to be stopped
    page.wait_for_selector("#stop", state="hidden")
    first = assistant_texts(page)[0]
    assert first and "tok/s" in page.locator(".message.assistant .stats").inner_text()

    page.click(".message.assistant .regenerate")
    page.evaluate(WHILE_STREAMING, {"length": 20, "stop": True})  # then stopped
    page.wait_for_selector("#stop", state="hidden")
    stopped = assistant_texts(page)[0]
    assert page.locator(".message.assistant .stats").inner_text() == "stopped"
    for _ in range(100):  # the server let the stopped reply's row go
        if requests.get(f"{page_server}/health", timeout=5).json()["rows"] == 0:
            break
        time.sleep(0.05)
    assert requests.get(f"{page_server}/health", timeout=5).json()["rows"] == 0
    assert 0 < len(stopped) and page.locator(".message").count() == 2

    page.fill("#max-tokens", "8")
    page.click(".message.user .edit")
    page.fill(".edit-text", "Tell me of Denmark.")
    page.click(".save-edit")
    page.wait_for_selector("#stop", state="hidden")
    assert page.locator(".message.user .content").all_inner_texts() == ["Tell me of Denmark."]
    assert len(assistant_texts(page)) == 1 and assistant_texts(page)[0]

    saved = assistant_texts(page)
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert assistant_texts(page) == saved
    assert page.locator("#conversations li").count() == 1
    assert page.locator("#conversations li span").inner_text() == "Tell me of Denmark."

    page.click("#new")
    assert page.locator(".message").count() == 0 and page.locator("#conversations li").count() == 2
    page.click("#conversations li:nth-child(1) .delete")
    assert page.locator("#conversations li").count() == 1


def test_a_reply_holding_html_is_shown_as_text(page):
    # the server's stream replaced by one whose reply holds markup: it must show as text
    evil = ("Markup shows as **text**: <script>window.pwned = 1</script> <img src=x onerror=\"window.pwned = 2\">"
            "\n\nand a `code` block:\n\n```html\n<b>code</b>\n```")
    chunks = [{"choices": [{"index": 0, "delta": {"content": evil[:40]}}]},
              {"choices": [{"index": 0, "delta": {"content": evil[40:]}}]},
              {"choices": [], "usage": {"completion_tokens": 9}}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.click("#new")
    page.fill("#input", "Show me some HTML")
    page.click("#send")
    page.wait_for_selector("#stop", state="hidden")
    page.unroute("**/v1/chat/completions")
    content = page.locator(".message.assistant .content")
    assert "<script>window.pwned = 1</script>" in content.inner_text()
    assert content.locator("script, img, b").count() == 0 and content.locator("strong").inner_text() == "text"
    assert content.locator("pre code").inner_text() == "<b>code</b>"
    assert page.evaluate("window.pwned") is None
    if os.environ.get("SERVE_SCREENSHOT"):
        page.screenshot(path=os.path.join(REPO, "assets", "serving.png"))
