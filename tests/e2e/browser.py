"""A real headless Chromium for the e2e tests, driven with selenium through Debian's chromedriver.

Debian's chromium and chromium-driver are installed with apt-get when missing (CI runs as root on
a fresh machine); without root or apt the tests skip with that reason. Each browser gets a fresh
profile and the flags that keep it off the network (no sync, component updates or background
fetches), so it loads only what the page under test asks for.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1000")


def ensure_installed() -> str | None:
    """None when Chromium and its driver are usable, else the reason to skip."""
    if os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK):
        return None
    if os.geteuid() != 0:
        return "Chromium is not installed and installing it needs root (apt-get install chromium chromium-driver)"
    if not shutil.which("apt-get"):
        return "Chromium is not installed and there is no apt-get to install it (install chromium chromium-driver)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            return f"{' '.join(cmd)} failed: {proc.stderr[-500:]}"
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    return f"installed chromium and chromium-driver but {missing} are still missing" if missing else None


@contextmanager
def headless_chromium():
    """A selenium WebDriver on a fresh headless Chromium profile; quits the browser afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mgpt4-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
