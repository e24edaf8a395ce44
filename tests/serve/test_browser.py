"""The chat page in a real headless Chromium (selenium): upload an image, ask, read the stream.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them with apt
where it can); skipped, naming what is missing, where they are not installed.
"""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not path]
pytestmark = pytest.mark.skipif(
    bool(missing),
    reason=f"no {' or '.join(missing)} on PATH: install Debian's chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver; make test does it where apt is available)",
)


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    # `make test` preloads the caching allocator (neva_jax/allocator.py) into the whole
    # process tree; Chromium's own allocator does not start beside a preloaded malloc
    # (the browser exits at once), so the driver and the browser run without it.
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    driver = webdriver.Chrome(service=Service(DRIVER, env=env), options=options)
    yield driver
    driver.quit()


def test_upload_ask_and_read_the_streamed_answer(server, browser, tmp_path):
    import base64

    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    question = "What colour are the shapes?"
    Image.new("RGB", (48, 36), (220, 40, 40)).save(tmp_path / "red.png")
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "red.png").read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0}
    want = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    want = want.json()["choices"][0]["message"]["content"]

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "tiny-llava"))
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "red.png"))
    wait.until(ec.visibility_of_element_located((By.ID, "preview")))
    browser.find_element(By.ID, "prompt").send_keys(question)
    # Count how often the answer's text changes while it streams in.
    browser.execute_script(
        """window.updates = 0;
        new MutationObserver((records) => {
          for (const r of records) if (r.target.closest && r.target.closest('.msg.assistant')
              || r.target.parentElement && r.target.parentElement.closest('.msg.assistant'))
            window.updates++;
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});"""
    )
    browser.find_element(By.ID, "send").click()
    done = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, '.msg.assistant[data-state="done"]'))
    )
    answer = done.find_element(By.CSS_SELECTOR, ".text").text
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert answer == want and answer
    assert browser.execute_script("return window.updates") > 2  # streamed in pieces
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert question in user.text
    assert user.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/")
    assert "done in" in browser.find_element(By.ID, "status").text
    assert (tmp_path / "chat.png").stat().st_size > 1000

    # A follow-up question sends the history; an error shows as an error bubble.
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "red.png"))
    browser.find_element(By.ID, "prompt").send_keys("And this one?")
    browser.find_element(By.ID, "send").click()
    error = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.error")))
    assert "has 2 images; this server takes at most 1" in error.text
