"""A headless Chromium driven by selenium, for the page's test: Debian's ``chromium`` and ``chromium-driver``
(``scripts/setup.sh`` installs them); where they are missing the test skips, naming what is."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = "chromedriver"


def chromium_driver():
    """A headless Chromium session, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    browser = next((path for path in map(shutil.which, CHROMIUM) if path), None)
    driver = shutil.which(DRIVER)
    if browser is None or driver is None:
        pytest.skip("chromium or chromedriver is not on PATH: as root, apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1500"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver))
