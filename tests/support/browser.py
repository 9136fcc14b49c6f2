"""Headless Chromium driven by Selenium: the Prefect UI as the physicist sees it.

Debian's ``chromium`` and ``chromium-driver`` packages (scripts/install.sh test
installs them) come in one version, so the driver always fits the browser and
nothing is downloaded at test time. The Prefect UI is a single-page app: what a
test looks for is waited for by its text, with a deadline, never by sleeping.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SIZE = (1280, 800)  # the screenshots in docs/img/ are this size


class BrowserUnavailable(RuntimeError):
    """Chromium or its driver is not installed."""


def _xpath_literal(text: str) -> str:
    """``text`` as an XPath 1.0 string literal (which has no escapes)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    parts = text.split("'")
    return "concat(" + ", \"'\", ".join(f"'{p}'" for p in parts) + ")"


class Browser:
    """One headless Chromium window on a web app at ``base_url``."""

    def __init__(self, base_url: str, shots: Path, failures: Path,
                 timeout: float = 30.0) -> None:
        for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
            if not shutil.which(path):
                raise BrowserUnavailable(
                    f"{path} not found: install the Debian package {package} "
                    f"(scripts/install.sh test does it)")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox",  # root in CI: no user namespace sandbox
                    "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={SIZE[0]},{SIZE[1]}"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        # --window-size counts the window's frame: set the page's own size exactly.
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": SIZE[0], "height": SIZE[1], "deviceScaleFactor": 1, "mobile": False})
        self.base_url = base_url.rstrip("/")
        self.shots = shots
        self.failures = failures
        self.timeout = timeout

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def _wait(self, condition: Any, what: str, timeout: float | None) -> Any:
        try:
            return WebDriverWait(self.driver, timeout or self.timeout,
                                 poll_frequency=0.2).until(condition)
        except TimeoutException:
            self.failures.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(self.failures / "timed-out.png"))
            raise AssertionError(
                f"timed out after {timeout or self.timeout:g} s waiting for {what} on "
                f"{self.driver.current_url}; the page said:\n{self.text()[-3000:]}") from None

    def text(self) -> str:
        """Everything the page shows now, as text."""
        try:
            return str(self.driver.find_element(By.TAG_NAME, "body").text)
        except Exception:  # noqa: BLE001 - a page mid-navigation has no body yet
            return ""

    def wait_until(self, check: Callable[[str], Any], what: str,
                   timeout: float | None = None) -> Any:
        """Wait until ``check(text of the page)`` is truthy; return what it returned."""
        return self._wait(lambda _driver: check(self.text()) or False, what, timeout)

    def wait_text(self, *texts: str, timeout: float | None = None) -> str:
        """Wait until the page shows every one of ``texts``; return the page's text."""
        return str(self.wait_until(lambda body: body if all(t in body for t in texts) else "",
                                   " and ".join(repr(t) for t in texts), timeout))

    def element(self, text: str, tag: str = "*", css_class: str | None = None,
                timeout: float | None = None) -> WebElement:
        """The first visible element whose text is ``text``, of this tag and carrying
        this CSS class when they are given (of any tag: the innermost such element)."""
        literal = _xpath_literal(text)
        has_class = (f"[contains(concat(' ', normalize-space(@class), ' '), ' {css_class} ')]"
                     if css_class else "")
        xpath = f"//{tag}{has_class}[normalize-space()={literal}]"
        if tag == "*":  # the innermost one: a click on it reaches its link or button
            xpath += f"[not(.//*[normalize-space()={literal}])]"

        def visible(driver: Any) -> WebElement | bool:
            for found in driver.find_elements(By.XPATH, xpath):
                if found.is_displayed():
                    return found
            return False

        return self._wait(visible, f"an element saying {text!r}", timeout)

    def first(self, css: str, timeout: float | None = None) -> WebElement:
        """The first visible element that the CSS selector ``css`` matches."""
        def visible(driver: Any) -> WebElement | bool:
            for found in driver.find_elements(By.CSS_SELECTOR, css):
                if found.is_displayed():
                    return found
            return False

        return self._wait(visible, f"an element matching {css!r}", timeout)

    def click(self, text: str, tag: str = "*", css_class: str | None = None,
              timeout: float | None = None) -> None:
        """Click the element saying ``text``, found again if the page redrew it between
        finding and clicking (the dashboard re-renders as its data comes in)."""
        for attempt in range(5):
            try:
                self.element(text, tag, css_class, timeout).click()
                return
            except StaleElementReferenceException:
                if attempt == 4:
                    raise
                time.sleep(0.2)

    def follow(self, text: str, tag: str, url_part: str, tries: int = 5) -> None:
        """Click the link saying ``text`` until the browser is at a URL containing
        ``url_part``: a click on a list the dashboard redraws as its data comes in can
        land on the old copy of the link and go nowhere."""
        for attempt in range(tries):
            self.click(text, tag)
            try:
                WebDriverWait(self.driver, 5, poll_frequency=0.2).until(
                    lambda driver: url_part in driver.current_url)
                return
            except TimeoutException:
                if attempt == tries - 1:
                    raise AssertionError(
                        f"clicking {text!r} {tries} times did not lead to a page at "
                        f"*{url_part}*; still at {self.driver.current_url}") from None

    def scroll_to(self, text: str, tag: str = "*") -> None:
        """Scroll so that the element saying ``text`` is at the top of the window."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                                   self.element(text, tag))

    def screenshot(self, name: str) -> Path:
        """Save the window as ``<shots>/<name>.png``."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        self.driver.quit()
