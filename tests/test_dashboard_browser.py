"""The dashboard as a user sees it: `hpo ui` on a real study's MLflow store, loaded in headless
Chromium. Needs Debian's chromium package (`.ci/run` installs it; elsewhere
`apt-get install chromium`); skips without it."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys

import pytest

from hpo import api
from hpo.api import Execution
from hpo.tracking import Tracking

from .conftest import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
]


def _render(url: str) -> str:
    """The page's DOM after its scripts ran (up to 20 s of virtual time)."""
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    return out.stdout


def test_the_dashboard_lists_the_study_and_its_runs(write_spec, tmp_path, sqlite_url):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.submit(write_spec(), trials=3, study_name="in-the-browser", storage=sqlite_url,
               execution=Execution(accelerator="cpu"), tracking=Tracking(uri=uri))
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "hpo", "ui", "--port", str(port), "--tracking-uri", uri],
                          stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        address = re.search(r"http://127\.0\.0\.1:\d+", ui.stdout.readline()).group(0)
        home = _render(address)
        assert "in-the-browser" in home, "the experiment list shows the study"
        runs = _render(f"{address}/#/experiments/1/runs")
        assert "in-the-browser" in runs
        matching = re.search(r"<strong>(\d+)</strong> matching runs", runs)
        assert matching and int(matching.group(1)) == 4, "the parent run and three trial runs"
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(30)
