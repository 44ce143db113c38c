"""Real-browser helpers for tests: headless Debian Chromium driven by Selenium.

Selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver explicitly, so Selenium
Manager never tries to download a browser or a driver. Install both with
`apt-get install chromium chromium-driver`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Without the networking flags, Chromium keeps retrying update, sync and component requests,
# which fail on a machine with no outside network.
CHROMIUM_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

# Artifact pages have this path in both Prefect UIs: /artifacts/artifact/<id> (V1) and
# /v2/artifacts/artifact/<id> (V2).
ARTIFACT_LINK_SELECTOR = "a[href*='/artifacts/artifact/']"


def chromium_available() -> bool:
    """Return whether both /usr/bin/chromium and /usr/bin/chromedriver are installed."""
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


@contextlib.contextmanager
def headless_chromium(window: tuple[int, int] = (1400, 1000)) -> Iterator[WebDriver]:
    """Start headless Chromium with a fresh profile and yield its Selenium WebDriver.

    `window` is the outer window size in pixels. The viewport, and so each screenshot, is
    shorter by the height that headless Chromium reserves for its toolbar (1400x857 for the
    default, measured with Chromium 156). The browser is quit and its profile removed on
    exit, also when the block raises.
    """
    profile = tempfile.mkdtemp(prefix="mmkd-chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={window[0]},{window[1]}")

    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def find_artifact_on_flow_run_page(
    driver: WebDriver,
    ui_url: str,
    flow_run_id: str,
    artifact_key: str,
    expected_cells: Sequence[str],
    screenshot_path: str | os.PathLike[str],
    timeout: float = 60,
) -> str:
    """Open a flow run in the Prefect UI, follow its artifact `artifact_key`, and wait for its cells.

    The steps are those a person takes in the Prefect 3.9 UI. Open
    `{ui_url}/runs/flow-run/{flow_run_id}`, click the run's "Artifacts" tab, and click the
    artifact card whose key is `artifact_key`. The cards show only the key, type and
    description, so the table itself is read on the artifact page that the card links to.
    There the function waits until the key and every string in `expected_cells` are visible,
    each cell matched exactly against the text of a visible <td> or <th>.

    `ui_url` is the server's address, such as http://127.0.0.1:4200, which serves the V1
    (Vue) UI at that path. The V2 (React) UI under `{ui_url}/v2` works too.

    A PNG screenshot of the final page is saved to `screenshot_path`, whose parent folders
    are created. Returns the page's visible text. Raises AssertionError when `timeout`
    seconds, shared by all steps, pass first. The message names the step that timed out,
    the strings still missing and the screenshot, which is saved in that case too.
    """
    deadline = time.monotonic() + timeout
    screenshot_path = Path(screenshot_path)
    screenshot_path.parent.mkdir(parents=True, exist_ok=True)
    page_url = f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"

    def wait_for(condition, step):
        remaining = max(deadline - time.monotonic(), 0.1)
        # The UIs re-render while data loads, so an element found a moment ago can go stale.
        # An overlay can also take a click. Both are retried until the deadline.
        wait = WebDriverWait(
            driver,
            remaining,
            poll_frequency=0.25,
            ignored_exceptions=(StaleElementReferenceException, ElementClickInterceptedException),
        )
        try:
            return wait.until(condition)
        except TimeoutException:
            fail(step() if callable(step) else step)

    def fail(step: str):
        saved = driver.save_screenshot(str(screenshot_path))
        missing = missing_strings(driver, artifact_key, expected_cells)
        where = f"saved to {screenshot_path}" if saved else f"could not be saved to {screenshot_path}"
        raise AssertionError(
            f"timed out after {timeout:g} s {step} for flow run {flow_run_id} at {page_url}. "
            f"Not visible on {driver.current_url}: {missing}. The screenshot was {where}."
        ) from None

    driver.get(page_url)

    # Each poll clicks the artifact card if it is shown, and otherwise the Artifacts tab
    # unless that tab is already selected. Clicking again matters because the V1 UI can reset
    # the tab to Logs while the page loads, as it does to a URL with ?tab=Artifacts.
    tab_seen = False

    def open_artifact_card(driver):
        nonlocal tab_seen
        for link in driver.find_elements(By.CSS_SELECTOR, ARTIFACT_LINK_SELECTOR):
            if link.is_displayed() and artifact_key in visible_lines(link.text):
                link.click()
                return True

        # The V1 UI renders tabs as <li class="p-tab">, the V2 UI as elements with role="tab".
        tabs = driver.find_elements(
            By.XPATH, "//*[@role='tab' or contains(@class, 'p-tab')][normalize-space(.)='Artifacts']"
        )
        for tab in tabs:
            if tab.is_displayed():
                tab_seen = True
                selected = tab.get_attribute("aria-selected") == "true" or "p-tab__active" in (
                    tab.get_attribute("class") or ""
                )
                if not selected:
                    tab.click()
                break
        return False

    wait_for(
        open_artifact_card,
        lambda: f"waiting for an artifact card with key {artifact_key!r}"
        if tab_seen
        else "waiting for the Artifacts tab",
    )

    def artifact_table_shown(driver):
        on_artifact_page = "/artifacts/artifact/" in driver.current_url
        return on_artifact_page and not missing_strings(driver, artifact_key, expected_cells)

    wait_for(artifact_table_shown, f"waiting for the cells of artifact {artifact_key!r}")

    if not driver.save_screenshot(str(screenshot_path)):
        raise AssertionError(f"Chromium could not save a screenshot to {screenshot_path}")
    return driver.find_element(By.TAG_NAME, "body").text


def missing_strings(driver: WebDriver, artifact_key: str, expected_cells: Sequence[str]) -> list[str]:
    """Return the key and cells that are not visible: the key as a line of text, each cell as a table cell.

    NOTE: only rendered rows count. The V2 UI shows a table artifact 10 rows per page by
    default, so a cell on a later page is reported missing.
    """
    try:
        lines = visible_lines(driver.find_element(By.TAG_NAME, "body").text)
        # WebElement.text is empty for hidden elements, so only visible cells are collected.
        cells = {cell.text.strip() for cell in driver.find_elements(By.CSS_SELECTOR, "td, th")}
    except StaleElementReferenceException:
        # The page re-rendered while it was read, so nothing counts as found on this poll.
        return [artifact_key, *expected_cells]

    missing = [] if artifact_key in lines else [artifact_key]
    missing += [cell for cell in expected_cells if cell not in cells]
    return missing


def visible_lines(text: str) -> set[str]:
    """Return the stripped, non-empty lines of an element's visible text."""
    return {line.strip() for line in text.splitlines() if line.strip()}


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def screenshot_folder() -> Path:
    """The folder for screenshots that outlive the test run: $MMKD_TEST_ARTIFACTS or test-artifacts/."""
    return Path(os.environ.get("MMKD_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")


def png_size(path: Path) -> tuple[int, int]:
    """Return a PNG's width and height from its IHDR chunk, asserting that the file is a PNG."""
    header = Path(path).read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, f"{path} does not start with the PNG signature"
    assert header[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
