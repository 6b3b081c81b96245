"""report.html in a real browser (headless Chromium driven by selenium): it must open offline with no console
error and no request for anything but the file itself, and plotly must have drawn every figure.

Chromium and its driver are Debian's `chromium` and `chromium-driver`; the session installs them with apt-get
when they are missing and we are root. Screenshots are kept as artifacts in $FACTSCOPE_ARTIFACTS (default:
`artifacts/` at the repository root): report.png (the first screen) and report-full.png (the whole page).
Set FACTSCOPE_REPORT_RUN=DIR to check an existing run directory (a copy of it) instead of the tiny test run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from factscope.report import write_report

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
BROWSER_SCHEMES = {"chrome", "chrome-untrusted", "devtools"}  # the browser's own pages (its new-tab page), not network
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
    "--force-device-scale-factor=1",
    # any host name lookup fails: a request that slipped through would also show up as a failed load
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
WIDTH, HEIGHT = 1440, 1000


def _find(candidates: tuple[str, ...], name: str) -> str | None:
    found = shutil.which(name)
    return found or next((path for path in candidates if os.access(path, os.X_OK)), None)


def find_chromium() -> tuple[str | None, str | None]:
    return _find(BROWSERS, "chromium"), _find(DRIVERS, "chromedriver")


def install_chromium() -> str:
    """apt-get install chromium chromium-driver, when we may; returns why it could not, or ""."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so apt-get cannot install it"
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}"
    return ""


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    browser, driver = find_chromium()
    if not (browser and driver):
        why = install_chromium()
        browser, driver = find_chromium()
        if not (browser and driver):
            pytest.skip(f"headless Chromium not found (chromium, chromedriver) and not installable: {why or 'still missing'}")
    return browser, driver


@pytest.fixture(scope="module")
def report_file(tmp_path_factory, tiny_llama_dir) -> Path:
    existing = os.environ.get("FACTSCOPE_REPORT_RUN")
    if existing:
        run_dir = tmp_path_factory.mktemp("browser") / "run"
        shutil.copytree(existing, run_dir, ignore=shutil.ignore_patterns("report.html", "figures"))
    else:
        from report_runs import build_full_run

        run_dir = build_full_run(tmp_path_factory.mktemp("browser"), tiny_llama_dir)
    return write_report(run_dir)


@pytest.fixture(scope="module")
def page(chromium, report_file, tmp_path_factory):
    """The report opened in headless Chromium, once every plotly figure has drawn (or 90 s have passed)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(120)
        driver.get("about:blank")
        driver.get_log("performance")  # drop what the browser did on its own before the report
        driver.get_log("browser")
        driver.get(report_file.as_uri())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(rendered for _, rendered, _ in figure_state(driver)):
            time.sleep(0.25)
        yield driver
    finally:
        driver.quit()


def figure_state(driver) -> list[tuple[str, bool, int]]:
    """(id, drawn, number of traces) for every plotly figure on the page."""
    return driver.execute_script(
        """return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => [
             d.id, !!d.querySelector('.plot-container .main-svg'), (d.data || []).length]);"""
    )


def network_events(driver) -> list[dict]:
    events = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"].startswith("Network."):
            events.append(message)
    return events


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("FACTSCOPE_ARTIFACTS") or REPO / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_every_figure_is_drawn(page, report_file):
    html = report_file.read_text(encoding="utf-8")
    expected = html.count('class="figure" data-figure=')
    state = figure_state(page)
    assert len(state) == expected > 10
    not_drawn = [name for name, rendered, _ in state if not rendered]
    assert not not_drawn, f"plotly did not draw: {not_drawn}"
    empty = [name for name, _, traces in state if traces == 0]
    assert not empty, f"figures without traces: {empty}"
    # each figure has its size: nothing collapsed to zero width or height
    sizes = page.execute_script(
        "return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => [d.id, d.clientWidth, d.clientHeight]);"
    )
    assert all(width > 300 and height > 250 for _, width, height in sizes), sizes


def test_no_console_error_and_no_request_beyond_the_file(page):
    events = network_events(page)
    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert requested, "the performance log saw no request at all: network logging is not working"
    outside = [url for url in requested if urlparse(url).scheme not in LOCAL_SCHEMES | BROWSER_SCHEMES]
    assert not outside, f"requests outside file://: {outside}"
    from_report = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
                   and urlparse(e["params"].get("documentURL", "")).scheme == "file"]
    assert from_report and all(urlparse(url).scheme in LOCAL_SCHEMES for url in from_report), from_report
    failed = [e["params"] for e in events if e["method"] == "Network.loadingFailed"]
    assert not failed, f"failed requests: {failed}"
    logs = page.get_log("browser")
    errors = [entry for entry in logs if entry["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"


def test_the_contents_lead_to_every_section(page):
    missing = page.execute_script(
        """return Array.from(document.querySelectorAll('nav.toc a'))
             .map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id));"""
    )
    assert missing == []


def test_the_drilldown_dropdown_switches_prompt(page):
    """Choose the second prompt of the drill-down: the title changes and nothing logs an error."""
    from selenium.webdriver.common.by import By

    figure = page.find_element(By.ID, "fig-drilldown")
    page.execute_script("arguments[0].scrollIntoView({block: 'start'});", figure)
    title_before = page.execute_script("return arguments[0].layout.title.text;", figure)
    figure.find_element(By.CSS_SELECTOR, ".updatemenu-header").click()
    options = figure.find_elements(By.CSS_SELECTOR, ".updatemenu-dropdown-button")
    assert len(options) > 1
    options[1].click()
    time.sleep(0.5)
    title_after = page.execute_script("return arguments[0].layout.title.text;", figure)
    assert title_after != title_before
    visible = page.execute_script("return arguments[0].data.filter(t => t.visible === true).length;", figure)
    assert visible > 0
    assert [e for e in page.get_log("browser") if e["level"] == "SEVERE"] == []


def test_screenshots_are_kept(page):
    """report.png: the first screen; report-full.png: the whole page (the artifacts a reviewer looks at)."""
    folder = artifacts_dir()
    page.execute_script("window.scrollTo(0, 0);")
    time.sleep(0.3)
    first = folder / "report.png"
    assert page.save_screenshot(str(first))
    metrics = page.execute_cdp_cmd("Page.getLayoutMetrics", {})
    height = int(metrics["cssContentSize"]["height"])
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        time.sleep(1.0)  # plotly's responsive resize
        shot = page.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    import base64

    full = folder / "report-full.png"
    full.write_bytes(base64.b64decode(shot["data"]))
    for path in (first, full):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
