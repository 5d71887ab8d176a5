"""What a command costs besides its work: each CLI verb as a whole process, split into the
interpreter's start, the imports the verb needs, the verb's own work timed inside a process whose
imports are done, and the rest (setup and teardown around it); prints one table.

    python bench/cli_cost.py                      # 5 runs of each, the 20-trial digits study
    python bench/cli_cost.py --runs 2 --epochs 2  # a taste

Verbs: ``hpo submit`` of the 20-trial digits study of ``bench/peer.py`` (no tracking), ``hpo
status`` of that study, ``hpo sites`` of a user model (``torch.nn.Transformer``, tiny). Every
figure is a median over fresh processes (each import timed in a new interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import SPACE

SITES_SPACE = """
name: sites
code_dir: .
model: {class_path: sites_model.Net, init_args: {width: 64}}
data: {dataset: digits}
dropout:
  groups:
    all: {match: "**", rate: {low: 0.0, high: 0.3}}
"""

SITES_MODEL = """
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.5),
                                    nn.Linear(width, 10))

    def forward(self, x):
        return self.layers(x)
"""

#: What each verb imports before its work: the CLI module, then the modules the verb reads.
IMPORTS = {
    "submit": "import hpo.cli, hpo.api",
    "status": "import hpo.cli, hpo.queries",
    "sites": "import hpo.cli, hpo.api",
}

#: The verb's work, timed inside a process whose imports are done (prints seconds).
WORK = {
    "submit": (
        "import time, hpo.api as a; from hpo.tracking import Tracking; t = time.perf_counter(); "
        "a.submit({space!r}, trials={trials}, storage={storage!r}, seed=0, study_name='inproc', "
        "tracking=Tracking(enabled=False)); print(time.perf_counter() - t)"
    ),
    "status": (
        "import time, hpo.queries as q; t = time.perf_counter(); q.status('peer', {storage!r}); "
        "print(time.perf_counter() - t)"
    ),
    "sites": "import time, hpo.api as a; t = time.perf_counter(); a.sites({sites!r}); print(time.perf_counter() - t)",
}


def _wall(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return wall


def _printed(code: str, env: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{code} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def measure(runs: int, trials: int, epochs: int, folder: Path) -> dict[str, dict[str, float]]:
    """Medians, in seconds, of each verb's parts."""
    env = {**os.environ, "HPO_STORAGE": "", "MLFLOW_TRACKING_URI": ""}
    space, sites = folder / "peer.yaml", folder / "sites.yaml"
    space.write_text(SPACE.format(epochs=epochs))
    sites.write_text(SITES_SPACE)
    (folder / "sites_model.py").write_text(SITES_MODEL)
    storage = f"sqlite:///{folder / 'peer.db'}"
    cli = [sys.executable, "-m", "hpo"]
    verbs = {
        "submit": lambda k: (
            [*cli, "submit", str(space), "--trials", str(trials), "--storage", storage]
            + ["--study-name", f"peer-{k}", "--seed", "0", "--no-tracking"]
        ),
        "status": lambda k: [*cli, "status", "peer", "--storage", storage],
        "sites": lambda k: [*cli, "sites", str(sites)],
    }
    # The study status reads.
    _wall(
        [*cli, "submit", str(space), "--trials", str(trials), "--storage", storage, "--seed", "0", "--no-tracking"], env
    )
    parts: dict[str, dict[str, list[float]]] = {v: {} for v in verbs}
    for k in range(runs):
        interpreter = _wall([sys.executable, "-c", "pass"], env)
        for verb, command in verbs.items():
            found = parts[verb]
            found.setdefault("whole process", []).append(_wall(command(k), env))
            found.setdefault("interpreter", []).append(interpreter)
            found.setdefault("imports", []).append(_wall([sys.executable, "-c", IMPORTS[verb]], env) - interpreter)
            code = WORK[verb].format(
                space=str(space), trials=trials, storage=f"sqlite:///{folder / f'inproc-{k}.db'}", sites=str(sites)
            )
            if verb == "status":
                code = WORK[verb].format(storage=storage)
            found.setdefault("work", []).append(_printed(code, env))
    medians = {
        verb: {part: statistics.median(values) for part, values in found.items()} for verb, found in parts.items()
    }
    for m in medians.values():
        m["rest"] = m["whole process"] - m["interpreter"] - m["imports"] - m["work"]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--json", type=Path, help="Also write the medians here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        medians = measure(args.runs, args.trials, args.epochs, Path(folder))
    print(
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs, load {os.getloadavg()[0]:.2f}; "
        f"medians of {args.runs} fresh processes; submit: digits MLP, {args.trials} trials x {args.epochs} epochs"
    )
    print("| verb | whole process (s) | interpreter | imports | work (in-process) | rest | whole / work |")
    print("|---|---|---|---|---|---|---|")
    for verb, m in medians.items():
        print(
            f"| hpo {verb} | {m['whole process']:.2f} | {m['interpreter']:.2f} | {m['imports']:.2f} | "
            f"{m['work']:.2f} | {m['rest']:.2f} | {m['whole process'] / m['work']:.1f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(medians, indent=1))


if __name__ == "__main__":
    main()
