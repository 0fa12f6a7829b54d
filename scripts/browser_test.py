"""Drive notebook 01's explorer in a real browser: JupyterLab + headless Chromium (Selenium).

What it checks, on a temporary copy of ``notebooks/01_linear_toy.ipynb``:

1. JupyterLab starts on 127.0.0.1 (a free port, a random token) and opens the notebook;
2. "Run All Cells" runs it and the explorer appears (sliders, figure, table);
3. moving the distractor slider (arrow keys on its handle) changes the figure's pixels
   and the table;
4. setting the distractor parallel to the signal greys the figure and replaces the
   table by the reason (no rho left on screen); a valid angle brings both back.

Every wait is bounded; the server is stopped and the copy removed at the end, also on
failure. Exit status 0 on success, 1 on a failed check, 2 when Chromium, chromedriver or
Selenium are missing. Needs ``chromium`` and ``chromium-driver`` (Debian) and
``pip install selenium``.

Usage: python scripts/browser_test.py [--keep-screenshots DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_linear_toy.ipynb"
SERVER_START_S = 90
NOTEBOOK_RUN_S = 180
UPDATE_S = 30

# the pixels of an image element, as a data URL (the widget's blob URL is same-origin)
PIXELS_JS = """
const img = arguments[0];
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
const d = ctx.getImageData(0, 0, c.width, c.height).data;
let grey = 0, sum = 0;
for (let i = 0; i < d.length; i += 4) {
  if (Math.abs(d[i] - 217) <= 1 && Math.abs(d[i + 1] - 217) <= 1 && Math.abs(d[i + 2] - 217) <= 1) grey++;
  sum = (sum * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 1000000007;
}
return [c.width * c.height, grey / (d.length / 4), sum];
"""


# labels cut off: a label whose text is wider than its box, a dropdown whose longest option is
LABELS_JS = """
const cut = [];
for (const el of document.querySelectorAll('.widget-label')) {
  if (el.textContent && el.scrollWidth > el.clientWidth + 1) cut.push(el.textContent);
}
const ctx = document.createElement('canvas').getContext('2d');
for (const sel of document.querySelectorAll('.widget-dropdown select')) {
  ctx.font = getComputedStyle(sel).font;
  for (const opt of sel.options) {
    if (ctx.measureText(opt.text).width > sel.clientWidth - 20) cut.push(opt.text);
  }
}
return cut;
"""


def missing_tools() -> list[str]:
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, token: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JUPYTER_CONFIG_DIR=str(folder / ".jupyter"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
               "--allow-root", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
               "jupyterlab.NeverCheckForUpdate"]
    log = open(folder / "server.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_for_server(port: int, token: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_S
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                json.load(response)
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {SERVER_START_S} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1500,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    return driver


class Explorer:
    """The explorer's elements in the page, found through their widget classes."""

    def __init__(self, driver):
        self.driver = driver

    def _find(self, css):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def slider(self, description: str):
        from selenium.webdriver.common.by import By
        for box in self._find(".widget-slider"):
            labels = box.find_elements(By.CSS_SELECTOR, ".widget-label")
            if labels and labels[0].text.strip() == description:
                return box
        raise LookupError(f"no slider {description!r}")

    def image(self):
        return self._find(".widget-image")[0]

    def table_text(self) -> str:
        tables = [e for e in self._find(".widget-html-content") if "estimator" in e.text
                  or "Cannot fit" in e.text]
        return tables[-1].text if tables else ""

    def pixels(self):
        return self.driver.execute_script(PIXELS_JS, self.image())

    def set_value(self, description: str, value: float) -> None:
        """Type ``value`` into the slider's readout and press Enter."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        readout = self.slider(description).find_elements(By.CSS_SELECTOR, ".widget-readout")[0]
        readout.click()
        self.driver.execute_script("arguments[0].textContent = '';", readout)
        readout.send_keys(str(value), Keys.ENTER)

    def nudge(self, description: str, presses: int) -> None:
        """Move the slider's handle with the arrow keys."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        handle = self.slider(description).find_elements(By.CSS_SELECTOR, ".noUi-handle")[0]
        handle.click()
        for _ in range(presses):
            handle.send_keys(Keys.ARROW_RIGHT)


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # the page is still building
            last_error = error
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {last_error})" if last_error else ""))


def run_all_cells(driver) -> None:
    from selenium.webdriver.common.by import By
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell"), 60,
               "the notebook to open")
    wait_until(lambda: "Idle" in driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel").text
               or driver.find_elements(By.XPATH, "//*[contains(@class, 'jp-Toolbar')]"
                                                 "//*[contains(text(), 'Python')]"), 60, "the kernel")
    menu = wait_until(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel")
                               if e.text == "Run"], 30, "the Run menu")
    menu[0].click()
    item = wait_until(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel")
                               if e.text == "Run All Cells"], 30, "Run All Cells")
    item[0].click()


def check(condition: bool, message: str, failures: list[str]) -> None:
    print(("ok    " if condition else "FAIL  ") + message, flush=True)
    if not condition:
        failures.append(message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-screenshots", type=Path, help="save screenshots to this folder")
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        print(f"browser test skipped: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="explorer-browser-"))
    shutil.copy(NOTEBOOK, folder / NOTEBOOK.name)
    port, token = free_port(), secrets.token_hex(16)
    server = start_server(folder, port, token)
    driver, failures = None, []
    try:
        wait_for_server(port, token, server)
        print(f"JupyterLab up on 127.0.0.1:{port} after {time.monotonic() - started:.1f} s", flush=True)
        driver = browser()
        driver.get(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}")
        run_all_cells(driver)
        page = Explorer(driver)
        wait_until(lambda: page.slider("distractor angle °") and page.pixels()[0] > 0
                   and "quality" in page.table_text(), NOTEBOOK_RUN_S, "the explorer")
        print(f"notebook run, explorer shown after {time.monotonic() - started:.1f} s", flush=True)
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});",
                              page.slider("signal angle °"))
        time.sleep(0.5)
        if args.keep_screenshots:
            args.keep_screenshots.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.keep_screenshots / "explorer.png"))
        labels = [e.text for e in driver.find_elements("css selector", ".widget-label") if e.text]
        cut = driver.execute_script(LABELS_JS)
        check("distractor angle °" in labels and "S_a+- uses" in labels and not cut,
              f"control labels and dropdown options shown in full ({len(labels)} labels"
              + (f"; cut off: {cut})" if cut else ")"), failures)
        buttons = [e.text for e in driver.find_elements("css selector", ".widget-button") if e.text]
        check(buttons == ["90°", "45°", "135°", "30°"], f"Figure 2 angle buttons {buttons}", failures)

        before_pixels, before_table = page.pixels(), page.table_text()
        moved = time.monotonic()
        page.nudge("distractor angle °", 10)
        changed = wait_until(lambda: page.pixels()[2] != before_pixels[2]
                             and page.table_text() != before_table, UPDATE_S, "the figure to change")
        print(f"slider moved: figure and table redrawn in {time.monotonic() - moved:.2f} s", flush=True)
        check(bool(changed), "moving the distractor slider changes the figure", failures)
        check(page.table_text() != before_table and "ρ =" in page.table_text(),
              "moving the distractor slider changes the table", failures)
        check(page.pixels()[1] < 0.1, "a valid setting is not greyed", failures)

        page.set_value("signal angle °", 0)
        page.set_value("distractor angle °", 0)
        wait_until(lambda: "Cannot fit" in page.table_text(), UPDATE_S, "the parallel setting")
        wait_until(lambda: page.pixels()[1] > 0.9, UPDATE_S, "the figure to grey")
        if args.keep_screenshots:
            driver.save_screenshot(str(args.keep_screenshots / "parallel.png"))
        check(page.pixels()[1] > 0.9, f"parallel setting greys the figure "
              f"({page.pixels()[1]:.0%} grey pixels)", failures)
        check("ρ =" not in page.table_text() and "parallel" in page.table_text(),
              "parallel setting clears the table (only the reason is left)", failures)
        check("explorer-invalid" in page.image().get_attribute("class"),
              "the figure carries the invalid class", failures)

        page.set_value("distractor angle °", 45)
        wait_until(lambda: "ρ =" in page.table_text() and page.pixels()[1] < 0.1, UPDATE_S,
                   "the explorer to come back")
        check(page.table_text() != "" and "Cannot fit" not in page.table_text(),
              "a valid angle brings figure and table back", failures)
    except Exception as error:  # report, then clean up
        failures.append(f"{type(error).__name__}: {error}")
        print(f"FAIL  {type(error).__name__}: {error}", flush=True)
        log = folder / "server.log"
        if log.exists():
            print("--- server log (last lines) ---\n" + "".join(log.read_text().splitlines(True)[-20:]))
    finally:
        if driver is not None:
            driver.quit()
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"browser test {'passed' if not failures else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
