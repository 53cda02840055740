"""The browser page of ``lorakit serve``, driven in real headless Chromium against the real server.

Needs ``chromium`` and ``chromedriver`` on PATH (``bash scripts/browser.sh`` installs them);
``LORAKIT_SKIP_BROWSER=1`` skips it, and without them it fails rather than skip silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait
from serve_helpers import serving
from tiny_adapter import make_adapter, make_base

pytestmark = pytest.mark.skipif(
    os.environ.get("LORAKIT_SKIP_BROWSER") == "1", reason="LORAKIT_SKIP_BROWSER=1"
)
WAIT = 20  # seconds, for every wait on the page
HEADLESS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve_page")
    base = make_base(root / "base")
    sst2 = make_adapter(root / "sst2", base)
    mrpc = make_adapter(root / "mrpc", base, task="mrpc")
    args = ["--model", str(base), "--adapter", f"sst2={sst2}", "--adapter", f"mrpc={mrpc}"]
    with serving(args) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "chromium and chromedriver must be on PATH: run `bash scripts/browser.sh` "
            "(or set LORAKIT_SKIP_BROWSER=1 to skip the browser test)"
        )
    options = Options()
    options.binary_location = chromium
    for arg in HEADLESS:
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager never looks for (or downloads) one.
    session = webdriver.Chrome(options=options, service=Service(driver))
    session.set_page_load_timeout(WAIT)
    try:
        yield session
    finally:
        session.quit()


def open_page(browser: WebDriver, url: str, adapter: str) -> None:
    """Load the page, wait for the adapter list, pick ``adapter``."""
    browser.get(url)
    WebDriverWait(browser, WAIT).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, f"#adapter option[value='{adapter}']"),
        f"the adapter picker has no {adapter!r} within {WAIT} s",
    )
    Select(browser.find_element(By.ID, "adapter")).select_by_value(adapter)


def read_bars(browser: WebDriver) -> list[tuple[str, float]]:
    """Wait for the result bars; (label, score) for each, in page order."""
    bars = WebDriverWait(browser, WAIT).until(
        ec.visibility_of_all_elements_located((By.CSS_SELECTOR, "#result .bar")),
        f"no result bars within {WAIT} s",
    )
    return [
        (bar.get_attribute("data-label"), float(bar.get_attribute("data-score") or "nan"))
        for bar in bars
    ]


def api_predict(url: str, adapter: str, inputs: str | list[str]) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"inputs": inputs, "adapter": adapter}, timeout=WAIT)


def assert_same_scores(page: list[tuple[str, float]], api: list[dict]) -> None:
    assert [label for label, _ in page] == [row["label"] for row in api]
    assert [score for _, score in page] == pytest.approx([row["score"] for row in api], abs=1e-5)


def test_page_shows_every_label_score_the_api_gives(browser: WebDriver, url: str) -> None:
    text = "the movie was not good at all"
    open_page(browser, url, "sst2")
    assert not browser.find_element(By.ID, "text_pair").is_displayed()
    browser.find_element(By.ID, "text").send_keys(text, Keys.ENTER)  # Enter submits
    bars = read_bars(browser)

    assert sorted(label for label, _ in bars) == ["negative", "positive"]
    assert sum(score for _, score in bars) == pytest.approx(1, abs=1e-5)
    assert [s for _, s in bars] == sorted((s for _, s in bars), reverse=True)
    top = browser.find_elements(By.CSS_SELECTOR, "#result .bar.top")
    assert [bar.get_attribute("data-label") for bar in top] == [bars[0][0]]
    assert browser.find_element(By.ID, "latency").text.endswith(" ms")
    assert browser.find_element(By.ID, "text").get_attribute("value") == text  # no newline typed

    response = api_predict(url, "sst2", text)
    assert response.status_code == 200
    assert_same_scores(bars, response.json())


def test_pair_adapter_shows_the_second_box(browser: WebDriver, url: str) -> None:
    first, second = "the film was great", "the movie was fine"
    open_page(browser, url, "mrpc")
    pair_box = browser.find_element(By.ID, "text_pair")
    assert pair_box.is_displayed()
    browser.find_element(By.ID, "text").send_keys(first)
    pair_box.send_keys(second)
    browser.find_element(By.ID, "submit").click()
    bars = read_bars(browser)

    assert sorted(label for label, _ in bars) == ["equivalent", "not_equivalent"]
    assert sum(score for _, score in bars) == pytest.approx(1, abs=1e-5)
    response = api_predict(url, "mrpc", [first, second])
    assert response.status_code == 200
    assert_same_scores(bars, response.json())

    Select(browser.find_element(By.ID, "adapter")).select_by_value("sst2")
    assert not pair_box.is_displayed()


def test_empty_text_shows_the_api_error(browser: WebDriver, url: str) -> None:
    open_page(browser, url, "sst2")
    browser.find_element(By.ID, "submit").click()
    error = WebDriverWait(browser, WAIT).until(
        ec.visibility_of_element_located((By.ID, "error")), f"no error shown within {WAIT} s"
    )

    response = api_predict(url, "sst2", "")
    assert 400 <= response.status_code < 500
    assert error.text == response.json()["error"]
    assert not browser.find_elements(By.CSS_SELECTOR, "#result .bar")
