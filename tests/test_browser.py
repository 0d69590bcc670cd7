"""End to end: `streamlit run` on a loopback port, driven by headless Chromium; a screenshot of the CAM grid."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(trained_run, tmp_path):
    port = free_port()
    env = {**os.environ, "MULTITASK_RUNS": str(trained_run.parent)}
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "apps" / "dashboard.py"),
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def chrome(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("chromium and chromedriver are needed (make test installs the Debian packages "
                    "chromium and chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1400,1800"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_dashboard_in_a_browser_shows_the_cam_grid(server, faces_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chrome(tmp_path)
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 120)
        painted = ("return Array.from(document.querySelectorAll('[data-testid=stImage] img'))"
                   ".filter(i => i.complete && i.naturalWidth > 0).length")
        # it opens on a held-out photo, explained: the input + 4 layers x 3 heads, all loaded
        wait.until(lambda b: "Grad-CAM grid" in b.page_source and b.execute_script(painted) >= 13)
        assert "macro-F1" in browser.page_source  # the headline scores
        choice = "//div[@data-testid='stRadio']//label[.//p[text()='upload']]"
        wait.until(EC.element_to_be_clickable((By.XPATH, choice))).click()
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        upload.send_keys(str(next((faces_root / "images").rglob("mask1.jpg"))))
        wait.until(lambda b: "mask1.jpg" in b.page_source and "Grad-CAM grid" in b.page_source
                   and b.execute_script(painted) >= 13)
        shot = Path(os.environ.get("MULTITASK_SCREENSHOT", tmp_path / "dashboard.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=stException]"), "the page shows an exception"
        assert "Traceback" not in browser.page_source
    finally:
        browser.quit()
