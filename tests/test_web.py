"""The web chat page of `finetune serve` in a real headless Chromium (Debian's chromium + chromium-driver, driven
by selenium): type a message, see the streamed answer, switch models, start a new conversation."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import PICO
from test_serve import Server, ask

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_page_streams_and_switches_models(tiny, adapters, tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    pico, star = adapters
    server = Server([pico, star, "--dtype", "fp32"], tmp_path)
    try:
        base_answer = ask(server.client(), tiny.name, "who are you 3", max_tokens=20)
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3)
        picker = Select(browser.find_element(By.ID, "model"))
        assert [o.get_attribute("value") for o in picker.options] == [tiny.name, "pico", "star"]
        for field, value in (("temperature", "0"), ("max_tokens", "20")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)

        def say(text: str) -> str:
            box = browser.find_element(By.ID, "input")
            box.send_keys(text)
            browser.find_element(By.ID, "send").click()
            answers = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == len(answers))
            return answers[-1].find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")

        picker.select_by_value("pico")
        assert say("who are you 3") == PICO  # streamed into the page from the adapter
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text.endswith("who are you 3")

        browser.find_element(By.ID, "new").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
        Select(browser.find_element(By.ID, "model")).select_by_value(tiny.name)
        assert say("who are you 3") == base_answer != PICO
        browser.save_screenshot(str(tmp_path / "chat.png"))
        if os.environ.get("FINETUNE_SCREENSHOT"):  # docs/web-chat.png is made this way
            Path(os.environ["FINETUNE_SCREENSHOT"]).write_bytes((tmp_path / "chat.png").read_bytes())
    finally:
        server.stop()
