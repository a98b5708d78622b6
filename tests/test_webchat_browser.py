"""The webchat page in a real headless Chromium against a real gateway process.

Two tabs write to one session at the same time while each turn takes
``TURN_MS``: they contend for the session's lane, so the page must show
"busy, retrying in N s", retry with the same Idempotency-Key, and in the end
every message is in the transcript exactly once with exactly one reply. The
page must load nothing from outside the gateway.

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install -y chromium``);
without it this test fails, it never skips.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.support import GatewayProcess, write_transcript

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]
TURN_MS = 400
MESSAGES_PER_TAB = 4
SESSION = "webchat:two-tabs"
TOKEN = "webchat-test-token"

# Reports every text the status line shows (the page's own script is left untouched).
STATUS_PROBE = """
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("status");
  new MutationObserver(() => console.log("status: " + status.textContent))
    .observe(status, { childList: true, characterData: true, subtree: true });
});
"""

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {
        "providers": [{"id": "echo", "type": "echo", "delayMs": TURN_MS}],
        "rateLimits": {"perSession": "1000/minute", "perSender": "1000/minute"},
        "auth": {"tokens": [TOKEN]},
    }
    with GatewayProcess(tmp_path_factory.mktemp("webchat") / "data", config) as process:
        yield process


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_tab(browser_context, gateway: GatewayProcess, statuses: list[str], requests: list[str]) -> Page:
    page = browser_context.new_page()
    page.on("console", lambda message: _record_status(message, statuses))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{gateway.url}/?session={SESSION}")
    expect(page.locator("#session-id")).to_have_value(SESSION)
    page.fill("#token", TOKEN)
    page.click("#settings button[type=submit]")
    return page


def _record_status(message: ConsoleMessage, statuses: list[str]) -> None:
    if message.text.startswith("status: "):
        statuses.append(message.text.removeprefix("status: "))


def test_two_tabs_writing_to_one_session_get_every_message_through_exactly_once(
    gateway: GatewayProcess, browser: Browser
) -> None:
    statuses: list[str] = []
    requests: list[str] = []
    context = browser.new_context()
    context.add_init_script(STATUS_PROBE)
    tabs = [open_tab(context, gateway, statuses, requests) for _ in range(2)]

    sent = []
    for number in range(MESSAGES_PER_TAB):
        for tab_number, tab in enumerate(tabs, start=1):
            text = f"tab {tab_number} message {number}"
            tab.fill("#message", text)
            tab.press("#message", "Enter")
            sent.append(text)

    for tab in tabs:
        expect(tab.locator("#transcript .pending")).to_have_count(0, timeout=60_000)
        expect(tab.locator("#transcript .failed")).to_have_count(0)
        # each tab shows the other's messages too (refresh after reply + polling)
        expect(tab.locator("#transcript .message")).to_have_count(2 * len(sent), timeout=10_000)
    context.close()

    transcript = httpx.get(
        f"{gateway.url}/v1/sessions/{SESSION}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()["messages"]
    users = [m for m in transcript if m["role"] == "user"]
    replies = Counter(m.get("replyTo") for m in transcript if m["role"] == "assistant")
    assert Counter(m["text"] for m in users) == Counter(sent), "a message is missing or duplicated"
    assert all(replies[m["id"]] == 1 for m in users), "a message has no reply or more than one"
    assert any(re.fullmatch(r"Busy, retrying in \d+ s \(attempt \d+ of \d+\)", s) for s in statuses), statuses
    assert all(url.startswith(gateway.url) or url.startswith("data:") for url in requests), requests


def test_a_refused_message_shows_the_problem_and_is_not_retried(gateway: GatewayProcess, browser: Browser) -> None:
    page = browser.new_page()
    posts: list[str] = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.goto(f"{gateway.url}/?session=webchat:no-token")
    page.fill("#message", "hello without a token")
    page.press("#message", "Enter")

    failed = page.locator("#transcript .failed")
    expect(failed).to_have_count(1, timeout=10_000)
    expect(failed).to_contain_text("Unauthorized")
    expect(page.locator("#status")).to_contain_text("Unauthorized")
    expect(page.locator("#status")).to_have_class(re.compile(r"\berror\b"))
    assert len(posts) == 1, posts
    page.close()


def test_the_page_loads_the_newest_messages_and_older_ones_on_scroll_up(
    gateway: GatewayProcess, browser: Browser
) -> None:
    session = "webchat:long"
    ids = write_transcript(gateway.data_dir, session, 130)  # no turn needed: as a long chat left it on disk
    page = browser.new_page()
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url) if "/messages" in request.url else None)
    page.goto(f"{gateway.url}/?session={session}")
    page.fill("#token", TOKEN)
    page.click("#settings button[type=submit]")
    shown = page.locator("#transcript .message")
    expect(shown).to_have_count(50, timeout=10_000)  # the newest page only
    expect(shown.first).to_contain_text("question 80")

    for count in (100, 130):
        page.locator(".transcript-wrap").evaluate("element => { element.scrollTop = 0; }")
        expect(shown).to_have_count(count, timeout=10_000)
    texts = shown.locator(".text").all_text_contents()
    assert texts == [f"question {n}" if n % 2 == 0 else f"answer {n}" for n in range(len(ids))]
    assert any(f"before={ids[80]}" in url for url in fetched) and any(f"before={ids[30]}" in url for url in fetched)
    page.close()
