"""hpo against the usual alternative, side by side: Ray Tune + OptunaSearch + Lightning, written
the way Ray Tune's "Using PyTorch Lightning with Tune" guide writes it, on the same task, search
space, budget and machine as hpo's modes; prints one table.

    python bench/peer.py --trials 20 --epochs 20

The task: scikit-learn's digits, an MLP whose input and hidden dropout rates, max-norm radius,
learning rate and width are searched (the same ranges on both sides), every trial all epochs (no
pruning, no early stopping), TPE, 2 trials at a time where the mode runs several. Each row is one
run in a fresh process, from a fresh study store. "best val acc" is the best trial's validation
accuracy as each tool selects it (hpo: the kept epoch; Tune: the last reported epoch, Tune's
default scope) and "its test acc" that trial's accuracy on the held-out test split, which
chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SPACE = """
name: peer
data: {{dataset: digits, seed: 0}}
model: {{arch: mlp, layers: 2, units: {{low: 32, high: 256, log: true}}}}
dropout:
  variant: inverted
  input: {{low: 0.0, high: 0.5}}
  hidden: {{low: 0.0, high: 0.7}}
  max_norm: {{choice: [null, 2.0, 3.0, 4.0]}}
training: {{lr: {{low: 0.01, high: 0.3, log: true}}, epochs: {epochs}, batch_size: 64}}
sampler: {{name: tpe, seed: 0}}
pruner: {{name: none}}
baselines: []
"""


# --- The peer, as Ray Tune's Lightning guide writes it ----------------------------------------


def peer(trials: int, epochs: int, workers: int) -> dict:
    import lightning.pytorch as pl
    import torch
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.integration.pytorch_lightning import TuneReportCallback
    from ray.tune.search.optuna import OptunaSearch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from hpo.data import DataSpec, load_data

    class DropoutMLP(pl.LightningModule):
        def __init__(self, config: dict) -> None:
            super().__init__()
            units = config["units"]
            self.net = nn.Sequential(
                nn.Flatten(),
                nn.Dropout(config["input_rate"]),
                nn.Linear(64, units),
                nn.ReLU(),
                nn.Dropout(config["hidden_rate"]),
                nn.Linear(units, units),
                nn.ReLU(),
                nn.Dropout(config["hidden_rate"]),
                nn.Linear(units, 10),
            )
            self.lr, self.max_norm = config["lr"], config["max_norm"]

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.max_norm:
                with torch.no_grad():
                    for m in self.net:
                        if isinstance(m, nn.Linear):
                            m.weight.renorm_(2, 0, self.max_norm)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_digits(config: dict, data=None) -> None:
        model = DropoutMLP(config)
        train = DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=64, shuffle=True)
        val = DataLoader(TensorDataset(data.val.x, data.val.y), batch_size=512)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[TuneReportCallback({"val_acc": "val_acc", "val_loss": "val_loss"}, on="validation_end")],
        )
        trainer.fit(model, train, val)
        model.eval()
        with torch.no_grad():
            test_acc = (model.net(data.test.x).argmax(1) == data.test.y).float().mean().item()
        tune.report({"val_acc": float(trainer.callback_metrics["val_acc"]), "test_acc": test_acc})

    param_space = {
        "units": tune.lograndint(32, 257),
        "input_rate": tune.uniform(0.0, 0.5),
        "hidden_rate": tune.uniform(0.0, 0.7),
        "max_norm": tune.choice([None, 2.0, 3.0, 4.0]),
        "lr": tune.loguniform(0.01, 0.3),
    }
    import ray

    data = load_data(DataSpec())
    start = time.perf_counter()
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False, logging_level="error")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_digits, data=data), {"cpu": 1}),
        tune_config=tune.TuneConfig(
            metric="val_acc",
            mode="max",
            num_samples=trials,
            max_concurrent_trials=workers,
            search_alg=OptunaSearch(sampler=TPESampler(seed=0)),
        ),
        param_space=param_space,
        run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="peer-"), verbose=0),
    )
    try:
        best = tuner.fit().get_best_result()
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    return {"wall": wall, "trials": trials, "val": best.metrics["val_acc"], "test": best.metrics["test_acc"]}


# --- hpo's modes -------------------------------------------------------------------------------


def hpo_mode(name: str, trials: int, epochs: int, workdir: Path, mlflow_store: Path) -> dict:
    """One hpo run; "MLflow on" modes track into ``mlflow_store`` (the warm-up study created it,
    as an earlier ``hpo submit`` in the same folder does), "new store" into a file MLflow creates."""
    import optuna

    from hpo import api
    from hpo.running.study import best_trial
    from hpo.tracking import Tracking

    workdir.mkdir(exist_ok=True)
    spec = workdir / f"{name.replace(' ', '_')}.yaml"
    spec.write_text(SPACE.format(epochs=epochs))
    storage = f"sqlite:///{workdir / (spec.stem + '.db')}"
    execution = {
        "hpo default": api.Execution(),
        "hpo default, MLflow on": api.Execution(),
        "hpo default, MLflow on, new store": api.Execution(),
        "in-process, one trial at a time": api.Execution(accelerator="cpu", group_size=1),
        "2 Ray workers": api.Execution(workers=2, cpus_per_trial=1, accelerator="cpu"),
        "2 Ray workers, MLflow on": api.Execution(workers=2, cpus_per_trial=1, accelerator="cpu"),
    }[name]
    store = workdir / (spec.stem + "-mlflow.db") if name.endswith("new store") else mlflow_store
    tracking = Tracking(enabled="MLflow on" in name, uri=f"sqlite:///{store}")
    start = time.perf_counter()
    handle, _ = api.submit(spec, trials=trials, storage=storage, seed=0, execution=execution, tracking=tracking)
    wall = time.perf_counter() - start
    best = best_trial(optuna.load_study(study_name="peer", storage=storage))
    return {"wall": wall, "trials": trials, "val": best.values[0], "test": best.user_attrs["test_acc"]}


#: "hpo default": ``api.Execution()``, what ``hpo submit`` runs without options (on a CPU: in this
#: process, groups of 5); "MLflow on": mirrored into an embedded MLflow store, as the CLI does
#: unless ``--no-tracking``: one that exists, or ("new store") one MLflow first creates (its schema
#: migrations, once per store).
MODES = [
    "ray tune peer",
    "hpo default",
    "hpo default, MLflow on",
    "hpo default, MLflow on, new store",
    "in-process, one trial at a time",
    "2 Ray workers",
    "2 Ray workers, MLflow on",
]


def run_mode(mode: str, trials: int, epochs: int, folder: Path) -> dict:
    """One mode in this process: the peer, or an hpo mode after a one-trial warm-up study (the
    peer's clock starts after its imports and data; the warm-up does hpo's imports, and with
    MLflow on creates the shared store if no earlier mode did)."""
    if mode == "ray tune peer":
        return peer(trials, epochs, workers=2)
    store = folder / "mlflow.db"
    hpo_mode("hpo default, MLflow on", 1, 1, folder / f"warm-up-{uuid.uuid4().hex[:6]}", store)
    return hpo_mode(mode, trials, epochs, folder / mode.replace(" ", "_").replace(",", ""), store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from hpo.output import configure

    configure(verbose_output=False)
    if args.one:  # a child process: one mode, its result as the last line
        print(json.dumps(run_mode(args.one, args.trials, args.epochs, args.folder)))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in dict.fromkeys(args.modes):
            # Each mode in a fresh process, so none runs in a heap another filled (after the
            # peer's Ray Tune imports and run, the same hpo study took about 1 s longer).
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    mode,
                    "--trials",
                    str(args.trials),
                    "--epochs",
                    str(args.epochs),
                    "--folder",
                    folder,
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    peer_wall = rows.get("ray tune peer", {}).get("wall")
    print(
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs; digits MLP, {args.trials} trials x "
        f"{args.epochs} epochs, TPE, no pruning; one run each, each in a fresh process"
    )
    print("| run | wall (s) | trials / min | vs peer | best val acc | its test acc |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        speed = f"{peer_wall / r['wall']:.1f}x" if peer_wall else "-"
        print(
            f"| {mode} | {r['wall']:.1f} | {60 * r['trials'] / r['wall']:.1f} | {speed} | {r['val']:.4f} | "
            f"{r['test']:.4f} |"
        )


if __name__ == "__main__":
    main()
