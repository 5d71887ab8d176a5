"""The dashboard as a user sees it: `hpo ui` on a real study's MLflow store, loaded in headless
Chromium. Needs Debian's chromium package (`.ci/run` installs it; elsewhere
`apt-get install chromium`); skips without it.

With ``HPO_SCREENSHOTS=DIR`` set, the tests also save what Chromium rendered as
``DIR/dashboard.png`` and ``DIR/optuna-dashboard.png`` (the docs' pictures: ``HPO_SCREENSHOTS=docs/images pytest
tests/test_dashboard_browser.py``)."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest

from hpo import api
from hpo.api import Execution
from hpo.tracking import Tracking

from .conftest import free_port, processes_with

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
]
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--virtual-time-budget=40000",
]


def _dom(url: str) -> str:
    """The page's DOM after its scripts ran (up to 20 s of virtual time)."""
    return subprocess.run(
        [CHROMIUM, *_FLAGS, "--window-size=1900,1000", "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout


def _render(url: str) -> str:
    """The page's text after its scripts ran."""
    text = re.sub(r"<style.*?</style>", " ", _dom(url), flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def _screenshot(url: str, path: Path) -> None:
    subprocess.run(
        [CHROMIUM, *_FLAGS, "--window-size=1400,800", f"--screenshot={path}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )


def _keep_screenshot(address: str, tmp_path: Path, name: str) -> None:
    """Save what Chromium draws at ``address`` as ``name`` in ``$HPO_SCREENSHOTS`` (else ``tmp_path``)."""
    shots = os.environ.get("HPO_SCREENSHOTS")
    target = Path(shots) / name if shots else tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    _screenshot(address, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stop(ui: subprocess.Popen, port: int) -> None:
    ui.send_signal(signal.SIGINT)
    ui.wait(30)
    assert processes_with(f"--port {port}") == [], "hpo ui stopped every process it started"


def test_the_printed_address_opens_on_the_trials_best_first(write_spec, tmp_path, sqlite_url):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.submit(
        write_spec(),
        trials=3,
        study_name="in-the-browser",
        storage=sqlite_url,
        execution=Execution(accelerator="cpu"),
        tracking=Tracking(uri=uri),
    )
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "hpo", "ui", "--port", str(port), "--tracking-uri", uri],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        address = re.search(r"http://127\.0\.0\.1:\d+\S*", ui.stdout.readline()).group(0)
        assert "/#/experiments/" in address and "viewStateShareKey=" in address, "the study's preset view"
        page = _render(address)
        assert "Sort: objective.val/acc" in page, "sorted by the objective"
        assert sorted(re.findall(r"trial-\d{3}", page)) == ["trial-000", "trial-001", "trial-002"], (
            "the three trials, not folded under the study's run"
        )
        assert "No data available" not in page
        trials = optuna.load_study(study_name="in-the-browser", storage=sqlite_url).trials
        # The table draws the columns a window shows: the objective's (beside the sort's label) and
        # the first searched dropout parameter's are among them.
        assert page.count("objective.val/acc") >= 2 and "dropout.variant" in page, "the preset columns"
        assert f"{trials[0].values[0]:.4f}"[:5] in page, "with the trials' values"
        ui.stdout.readline()
        charts = re.search(r"http://127\.0\.0\.1:\d+\S*", ui.stdout.readline()).group(0)
        assert "compareRunsMode=CHART" in charts
        drawn = _render(charts)
        assert "Dropout vs val/acc" in drawn and "Parallel Coordinates" in drawn, drawn[:3000]

        reported = subprocess.run(
            [sys.executable, "-m", "hpo", "report", "in-the-browser", "--storage", sqlite_url, "--tracking-uri", uri],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert reported.returncode == 0, reported.stderr[-2000:]
        parent = optuna.load_study(study_name="in-the-browser", storage=sqlite_url).user_attrs["hpo:mlflow"]
        base = address.split("/#/")[0]
        run_page = (
            f"{base}/#/experiments/{parent['experiment_id']}/runs/{parent['run_id']}?workflowType=machine_learning"
        )
        sources = re.findall(r'<img[^>]+src="([^"]*get-artifact[^"]*)"', _dom(run_page))
        assert sources, "the study run's description draws the report's plots"
        with urllib.request.urlopen(f"{base}/{html.unescape(sources[0])}", timeout=30) as image:
            assert image.read()[:8] == b"\x89PNG\r\n\x1a\n"
        home = _render(f"http://127.0.0.1:{port}")
        assert "in-the-browser" in home, "the experiment list shows the study"
        _keep_screenshot(address, tmp_path, "dashboard.png")
    finally:
        _stop(ui, port)


def test_optuna_dashboard_opens_on_the_study_with_its_objective_named(write_spec, tmp_path, sqlite_url):
    """`hpo ui --viewer optuna` serves the study store itself (tracking off) and prints the
    study's page, where the objective is called by its name, not "Objective 0"."""
    api.submit(
        write_spec(),
        trials=4,
        study_name="in-optuna-dashboard",
        storage=sqlite_url,
        execution=Execution(accelerator="cpu"),
        tracking=Tracking(enabled=False),
    )
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "hpo", "ui", "--viewer", "optuna", "--port", str(port), "--storage", sqlite_url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        address = re.search(r"http://127\.0\.0\.1:\d+\S*", ui.stdout.readline()).group(0)
        assert "/dashboard/studies/" in address
        page = _render(address)
        assert "in-optuna-dashboard" in page and "val/acc" in page, page[:2000]
        assert "Objective 0" not in page
        _keep_screenshot(address, tmp_path, "optuna-dashboard.png")
    finally:
        _stop(ui, port)
