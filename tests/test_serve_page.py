"""The web chat page of `edgec serve` in a real headless browser: Debian's chromium driven through chromedriver
(selenium). A missing browser fails these tests: `.ci/run` installs it (apt-get install chromium chromium-driver)."""

from __future__ import annotations

from pathlib import Path

import openai_harmony as oh
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait
from serving import FINAL, KEY, harmony_prompt, live_server, scripted_servers, user


@pytest.fixture
def scripted():
    yield from scripted_servers()


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), \
        "the page test needs Debian's chromium: apt-get install -y chromium chromium-driver (.ci/run does it)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live_mlx(tiny_mlx):
    yield from live_server(tiny_mlx)


def ask(driver, text: str, n: int):
    """Type a message, press Enter, wait for the n-th assistant reply to finish; return it."""
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) >= n)
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n - 1]


def test_page_chats_with_a_converted_model(browser, live_mlx):
    url, name = live_mlx
    browser.get(url + "/")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    key.send_keys(Keys.TAB)  # 'change': the page stores the key and asks for the model again
    WebDriverWait(browser, 30).until(lambda d: name in d.find_element(By.ID, "model").text)
    Select(browser.find_element(By.ID, "effort")).select_by_value("low")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")
    reply = ask(browser, "Hello there", 1)
    stats = reply.find_element(By.CLASS_NAME, "stats").text
    prompt = len(harmony_prompt([user("Hello there")], oh.ReasoningEffort.LOW))
    assert f"prompt {prompt} tok (cached 0)" in stats and "completion 12 tok" in stats, stats
    assert "tok/s" in stats and "TTFT" in stats and "finish length" in stats
    assert reply.find_element(By.CLASS_NAME, "content").text.strip()
    assert not reply.find_elements(By.CSS_SELECTOR, ".error")
    second = ask(browser, "And again", 2).find_element(By.CLASS_NAME, "stats").text
    cached = int(second.split("(cached ")[1].split(")")[0])
    assert cached >= prompt, second  # the first turn's prompt came from the cache


def test_page_shows_reasoning_collapsed(browser, scripted):
    srv = scripted([FINAL])
    browser.get(srv.url + "/")
    WebDriverWait(browser, 30).until(lambda d: "scripted" in d.find_element(By.ID, "model").text)
    reply = ask(browser, "Weather?", 1)
    details = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert details.is_displayed() and details.get_attribute("open") is None  # shown, collapsed
    assert reply.find_element(By.CLASS_NAME, "content").text == "Sunny, 21 C."
    assert details.find_element(By.TAG_NAME, "pre").get_attribute("textContent") == "It is sunny."
    details.find_element(By.TAG_NAME, "summary").click()
    assert details.get_attribute("open") is not None and "It is sunny." in details.text
    assert "finish stop" in reply.find_element(By.CLASS_NAME, "stats").text


def test_page_stop_button_cancels_the_stream(browser, scripted):
    srv = scripted([], delay=0.05)
    browser.get(srv.url + "/")
    WebDriverWait(browser, 30).until(lambda d: "scripted" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "input").send_keys("Talk for long" + Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
    assert "stopped by you" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
    WebDriverWait(browser, 10).until(lambda d: not srv.engine.busy)  # the server stopped generating
    assert len(srv.backend.ids) < 300  # the page asked for 512 tokens: it stopped well before
