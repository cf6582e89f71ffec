"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, selenium).

Checks what a person would see: every publisher in the table, a state change appearing without
a reload, the log tail following new lines once logged in with the token, a hostile log line
shown as text with no script run, and no log line at all without a credential. Waits are
WebDriverWait polls of the page under a deadline (the browser has no event to wait on).
The screenshot is saved in the test's tmp dir (and in $PUBMON_SCREENSHOT_DIR when set: that
is how docs/dashboard.png is made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import RunningDaemon, daemon_header, run_daemon, toml_publisher
from pubmon.demo import free_ports

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (make test installs them)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

TOKEN = "dashboard-test-token-0123456789"
SECRET = "SECRET_TOKEN=hunter2"
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-crash-reporter", "--no-first-run", "--window-size=1200,560",
                f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, what: object, timeout: float = 10) -> object:
    return WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
    ).until(what)  # type: ignore[arg-type]


def rows(driver: webdriver.Chrome) -> dict[str, str]:
    # Read in one script: the page replaces the whole tbody on every update.
    pairs = driver.execute_script(
        "return [...document.querySelectorAll('#publishers tbody tr')]"
        ".map((tr) => [tr.dataset.name, tr.dataset.state])"
    )
    return dict(pairs)


async def cli(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pubmon", *args, stdout=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


async def test_dashboard_live_table_log_tail_and_escaping(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    (port,) = free_ports(1)
    fifo = tmp_path / "say"
    os.mkfifo(fifo)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    talker = ["sh", "-c", f"echo {SECRET}; while true; do cat {fifo}; done"]
    config = tmp_path / "pubmon.toml"
    config.write_text(
        daemon_header(tmp_path, socket=True)
        + f'[http]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token}"\n'
        + toml_publisher("talker", talker)
        + toml_publisher("worker", ["sleep", "3600"], numprocs=2)
        + toml_publisher("idle", ["sleep", "3600"])
    )
    sock = str(tmp_path / "pubmon.sock")
    url = f"http://127.0.0.1:{port}"
    async with run_daemon(config) as d:
        try:
            await _check_dashboard(d, browser, url, sock, fifo, tmp_path)
        finally:
            if d.proc.returncode is None:
                d.signal(signal.SIGTERM)  # kills whole groups (the fifo reader's cat too)
                await d.wait_exit()
        assert d.proc.returncode == 0


async def _check_dashboard(
    d: RunningDaemon, browser: webdriver.Chrome, url: str, sock: str, fifo: Path, tmp_path: Path
) -> None:
    # Without a credential: the table, states, no log line anywhere.
    browser.get(url + "/")
    names = ["talker", "worker:0", "worker:1", "idle"]
    wait(browser, lambda b: list(rows(b)) == names)
    assert set(rows(browser).values()) == {"RUNNING"}
    browser.get(url + "/p/talker")
    wait(browser, lambda b: "credential" in b.find_element(By.ID, "lognote").text)
    assert SECRET not in browser.page_source
    assert browser.find_element(By.ID, "log").text == ""

    # A state change appears without a reload (a reload would drop the marker).
    browser.get(url + "/")
    wait(browser, lambda b: len(rows(b)) == 4)
    browser.execute_script("document.body.dataset.marker = 'same page'")
    assert await cli("stop", "idle", "--socket", sock) == 0
    wait(browser, lambda b: rows(b).get("idle") == "STOPPED")
    assert browser.execute_script("return document.body.dataset.marker") == "same page"
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("PUBMON_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["PUBMON_SCREENSHOT_DIR"]) / "dashboard.png")

    # Logged in with the token (the form, no script needed): the tail follows new lines.
    browser.get(url + "/login")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    wait(browser, lambda b: b.current_url == url + "/")
    browser.get(url + "/p/talker")
    wait(browser, lambda b: SECRET in b.find_element(By.ID, "log").text)
    with open(fifo, "w") as f:
        f.write("a new line\n" + HOSTILE + "\n")
    log = browser.find_element(By.ID, "log")
    wait(browser, lambda b: HOSTILE in log.text)
    assert log.text.splitlines() == [SECRET, "a new line", HOSTILE]
    assert browser.find_elements(By.CSS_SELECTOR, "#log script, #log img") == []
    assert browser.title == "pubmon: talker"  # the hostile line's script never ran

    # A restart shows up in the page's recent exits, and the tail goes on across it.
    assert await cli("restart", "talker", "--socket", sock) == 0
    wait(browser, lambda b: "SIGTERM" in b.find_element(By.CSS_SELECTOR, "#exits tbody").text)
    wait(browser, lambda b: b.find_element(By.ID, "log").text.count(SECRET) == 2)
    browser.save_screenshot(str(tmp_path / "publisher.png"))
