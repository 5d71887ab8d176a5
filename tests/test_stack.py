"""The cluster stack of docker/, built and run for real: docker/stack_test.py builds the images
offline with podman, starts compose.yaml with two Ray worker containers, runs studies through it
(the hpo service, Ray's client from this host), loads the dashboard, injects faults and checks
that ``down``/``up`` keeps the state. Needs root, podman, runc, mmdebstrap and docker-compose
from Debian's packages (`.ci/run` installs them); skips, saying which is missing, without them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [
    tool for tool in ("podman", "runc", "mmdebstrap", "docker-compose", "chromium") if shutil.which(tool) is None
]
if not any(Path(p).exists() for p in ("/usr/lib/cni/dnsname", "/usr/lib/podman/aardvark-dns")):
    MISSING.append("a DNS plugin for podman's networks")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs {', '.join(MISSING)} (apt-get install podman runc mmdebstrap "
        "docker-compose chromium golang-github-containernetworking-plugin-dnsname)",
    ),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="the stack test runs podman as root"),
]


@pytest.mark.timeout(3000)
def test_the_stack_builds_runs_studies_and_survives_faults(tmp_path):
    report = tmp_path / "stack.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "stack_test.py"), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=2900,
        check=False,
    )
    failure = [line for line in out.stderr.splitlines() if line.startswith("stack test failed")]
    assert out.returncode == 0, "\n".join(failure) + "\n" + (out.stdout + out.stderr)[-4000:]
    result = json.loads(report.read_text())
    phases = [name for name, _ in result["timings"]]
    assert {
        "study via the hpo service",
        "study via ray:// from the host",
        "study as a Ray job through 8265",
        "dashboard and auth",
        "down, up: state kept",
    } <= set(phases)
    assert set(result["faults"]) == {"worker killed", "MLflow stopped", "PostgreSQL restarted", "driver killed"}
    leftovers = subprocess.run(
        ["pgrep", "-f", "podman system service .*hpo-stack"], capture_output=True, text=True, check=False
    ).stdout
    assert not leftovers.strip(), "the podman service the test started is still running"
