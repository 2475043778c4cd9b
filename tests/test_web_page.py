"""The web page at ``/`` in a real headless Chromium: type a prompt, watch tokens arrive."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from browser import Browser, find_chromium

OUTPUT = Path(os.environ.get("MULLAMA_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    b = Browser(binary)
    yield b
    b.close()


def test_page_streams_tokens_live(server, browser):
    browser.goto(server.url + "/")
    assert browser.evaluate("document.title") == "mullama"
    browser.type_into("#prompt", "Once upon a time")
    browser.type_into("#max-tokens", "80")
    browser.type_into("#temperature", "0")
    before = server.metrics()["mullama_generated_tokens_total"]
    browser.click("#send")
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while browser.evaluate("document.getElementById('stats').dataset.done") != "1" or not seen:
        assert time.monotonic() < deadline, "the page did not finish"
        seen.append(int(browser.evaluate("document.getElementById('stats').dataset.tokens || '0'")))
        time.sleep(0.01)
    final = int(browser.evaluate("document.getElementById('stats').dataset.tokens"))
    text = browser.evaluate("document.getElementById('generated').textContent")
    stats = browser.evaluate("document.getElementById('stats').textContent")
    browser.screenshot(OUTPUT / "web_page.png")
    assert browser.evaluate("document.getElementById('error').textContent") == ""
    # tokens arrived one after another, not all at the end
    partial = {n for n in seen if 0 < n < final}
    assert len(partial) >= 3, seen
    assert text.strip() and final >= 10
    assert "tok/s" in stats and "done" in stats
    rate = float(stats.split(" tok/s")[0].split("·")[-1])
    assert rate > 0
    assert server.metrics()["mullama_generated_tokens_total"] - before == 80
    assert browser.evaluate("document.querySelector('#output .prompt').textContent") == "Once upon a time"
    assert (OUTPUT / "web_page.png").stat().st_size > 5000


def test_page_stop_button_cancels_the_stream(server, browser):
    browser.goto(server.url + "/")
    browser.type_into("#max-tokens", "1000")
    browser.click("#send")
    deadline = time.monotonic() + 30
    while int(browser.evaluate("document.getElementById('stats').dataset.tokens || '0'")) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    browser.click("#stop")
    m = server.wait_idle()
    assert m['mullama_streams_total{endpoint="stream",finish_reason="cancelled"}'] >= 1
    assert browser.evaluate("document.getElementById('send').disabled") is False
