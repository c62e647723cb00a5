"""The shop page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

Search a product, add two to the basket, see two models' recommendations change, open a product page;
a screenshot of each step goes to ``test-output/browser/`` (and the test's own folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from llmrec.serve.app import create_app
from llmrec.serve.settings import ServeSettings

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "browser"


@pytest.fixture()
def server(served_runs: dict[str, Path], tmp_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(runs=[served_runs["sasrec"], served_runs["itemknn"], served_runs["semantic-id"]],
                             workdir=tmp_path / "serve", port=port)
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (.ci/run does)")
        pytest.skip("no chromium / chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_search_basket_recommendations_and_product_page(server: str, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 30)  # type: ignore[arg-type]
    OUTPUT.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        d.save_screenshot(str(tmp_path / f"{name}.png"))  # type: ignore[attr-defined]
        shutil.copy(tmp_path / f"{name}.png", OUTPUT / f"{name}.png")

    def lists() -> dict[str, str]:
        cards = d.find_elements(By.CSS_SELECTOR, "#recs .card")  # type: ignore[attr-defined]
        return {c.get_attribute("data-model"): c.get_attribute("data-items") or "" for c in cards}

    def click(css: str) -> None:
        """Click the element ``css`` names, finding it again if the page re-rendered it meanwhile."""
        from selenium.common.exceptions import StaleElementReferenceException

        def attempt(_: object) -> bool:
            try:
                d.find_element(By.CSS_SELECTOR, css).click()  # type: ignore[attr-defined]
                return True
            except StaleElementReferenceException:  # the search re-rendered the list as the user typed
                return False

        wait.until(attempt)

    d.get(server)  # type: ignore[attr-defined]
    wait.until(lambda _: d.execute_script("return document.body.dataset.ready") == "1")  # type: ignore[attr-defined]
    wait.until(lambda _: all(lists().values()) and len(lists()) == 3)
    empty = lists()
    shot("01-empty-basket")

    search = d.find_element(By.ID, "search")  # type: ignore[attr-defined]
    search.send_keys("Product 7")
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, '#results li[data-item="item-7"]'))  # type: ignore[attr-defined]
    shot("02-search")
    click('#results li[data-item="item-7"] button.add')
    wait.until(lambda _: d.find_element(By.ID, "basket-count").text == "1")  # type: ignore[attr-defined]
    search.clear()
    search.send_keys("Product 8")  # the keyboard path: arrow down to the first result, + adds it
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, '#results li[data-item="item-8"]'))  # type: ignore[attr-defined]
    search.send_keys(Keys.ARROW_DOWN, "+")
    wait.until(lambda _: d.find_element(By.ID, "basket-count").text == "2")  # type: ignore[attr-defined]
    wait.until(lambda _: all(v and v != empty[k] for k, v in lists().items()))
    after = lists()
    shot("03-basket-of-two")
    basket = [li.get_attribute("innerText") for li in d.find_elements(By.CSS_SELECTOR, "#basket li")]  # type: ignore[attr-defined]
    assert any("Product 7" in b for b in basket) and any("Product 8" in b for b in basket)
    # two models' lists appear, differ from the empty-basket ones, and leave the basket out
    assert after["sasrec"] != empty["sasrec"] and after["itemknn"] != empty["itemknn"]
    for items in after.values():
        assert not {"item-7", "item-8"} & set(items.split(","))
    assert after["itemknn"].split(",")[0] == "item-9"  # the cycle continues after item 8
    latency = d.find_element(By.CSS_SELECTOR, '#recs .card[data-model="sasrec"] .sub').text  # type: ignore[attr-defined]
    assert "ms" in latency

    click('#recs .card[data-model="itemknn"] li a')
    wait.until(lambda _: d.find_element(By.ID, "view-item").is_displayed())  # type: ignore[attr-defined]
    wait.until(lambda _: d.find_element(By.ID, "item-title").text == "Product 9")  # type: ignore[attr-defined]
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#similar .card li")) >= 8)  # type: ignore[attr-defined]
    assert "C1" in d.find_element(By.ID, "item-cats").text  # type: ignore[attr-defined]
    shot("04-product-page")

    d.get(server + "#/users")  # type: ignore[attr-defined]
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#user-recs .card[data-items]")) == 3)  # type: ignore[attr-defined]
    shot("05-shoppers")
    d.get(server + "#/models")  # type: ignore[attr-defined]
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#models-table tbody tr")) == 3)  # type: ignore[attr-defined]
    shot("06-models")
    d.set_window_size(390, 844)  # type: ignore[attr-defined]
    d.get(server)  # type: ignore[attr-defined]
    wait.until(lambda _: d.execute_script("return document.body.dataset.ready") == "1")  # type: ignore[attr-defined]
    width = d.execute_script("return document.documentElement.scrollWidth")  # type: ignore[attr-defined]
    assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"
    shot("07-phone")
