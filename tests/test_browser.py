"""The explorer of notebook 01 in a real browser (scripts/browser_test.py).

Skipped unless Chromium, chromedriver and Selenium are installed (Debian: ``apt-get
install chromium chromium-driver``; ``pip install selenium``). It starts JupyterLab on
127.0.0.1, runs the notebook in headless Chromium, moves the distractor slider and
checks that the figure and the table follow, and that a parallel setting clears them.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import browser_test  # noqa: E402

pytestmark = pytest.mark.skipif(bool(browser_test.missing_tools()),
                                reason=f"needs {', '.join(browser_test.missing_tools())}")


def test_explorer_in_a_browser():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "browser_test.py")],
                          capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "browser test passed" in done.stdout
    assert "FAIL" not in done.stdout
