"""Headless Debian chromium driven through its own chromedriver: no Selenium Manager, no browser download."""

from __future__ import annotations

import os
import pathlib
import shutil
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

# Debian's packages (`make system-deps` installs chromium and chromium-driver); never a downloaded build.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Screenshots of every page, kept as artifacts of the run (build/ is git-ignored).
ARTIFACTS = pathlib.Path(__file__).resolve().parents[2] / "build" / "artifacts" / "console"


def start_chromium(profile_dir: pathlib.Path) -> webdriver.Chrome:
    """A headless chromium on its own profile. A missing browser fails here: the Makefile installs it."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            raise AssertionError(f"{path} is missing: `make system-deps` installs Debian's chromium and "
                                 "chromium-driver")
    # Selenium must not fetch a driver or browser of its own (there is no network here, and CI has none either).
    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where chromium refuses its sandbox; the page is our own console on loopback.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", f"--user-data-dir={profile_dir}", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-sync"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile_dir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


def wait_until(driver: webdriver.Chrome, check, timeout: float, what: str):
    """check(driver)'s first truthy value within `timeout` s; else a failure naming `what` and the page's errors."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: check(d))
    except Exception as exc:
        screenshot(driver, f"failed-{int(time.time())}")
        errors = driver.find_elements("css selector", "[role=alert]")
        shown = [e.text for e in errors if e.text]
        raise AssertionError(f"no {what} within {timeout}s ({type(exc).__name__}: {exc}); page errors: {shown}; "
                             f"url: {driver.current_url}; browser log: {browser_errors(driver)}") from exc


def screenshot(driver: webdriver.Chrome, name: str) -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def browser_errors(driver: webdriver.Chrome) -> list[str]:
    """Console messages at SEVERE level (script errors, failed loads)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
