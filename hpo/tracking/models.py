"""Trained networks in MLflow: a trial's network rebuilt with its kept weights, logged as an
MLflow PyTorch model, and found again from the study run's ``hpo.best_model`` tag."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.running.store import redact
from hpo.running.study import StudyHandle
from hpo.tracking.runs import BEST_MODEL_TAG, NUMBER_TAG, PARENT_ATTR, Tracking, client, log_to_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from hpo.data import TrialData


def trained_network(config: Any, state: dict[str, Any], data: TrialData) -> Any:
    """A trial's network (``config``: its :class:`~hpo.space.TrialConfig`, or a user model's
    :class:`~hpo.models.user_model.UserTrialConfig`, built again with the trial's sites and
    variants) with its kept weights, in eval mode. Built in the caller's thread, inside
    ``torch.random.fork_rng``: initialising layers draws from torch's global generator, which a
    trial training at the same time in this process would otherwise share, making its dropout
    masks depend on timing."""
    import torch

    from hpo.running.trial import build_network

    with torch.random.fork_rng():
        net = build_network(config, data)
    net.load_state_dict(state)
    return net.eval()


def model_example(data: TrialData) -> Any:
    """A few inputs for a logged model's input example and signature: validation rows of a
    built-in data set, the first training inputs of the user's data when they are one tensor,
    else ``None``."""
    from hpo.data import Splits

    if isinstance(data, Splits):
        return data.val.x[:4]
    from hpo.models.user_model import model_inputs

    inputs = model_inputs(data.example_batch())
    return None if inputs is None else inputs[:4]


def code_paths(code_dir: str | None) -> list[str] | None:
    """The Python modules and packages of the user's code folder, which MLflow copies beside the
    model and puts on ``sys.path`` when it loads it, so the model loads in a process that has
    never seen the folder."""
    if code_dir is None:
        return None
    folder = Path(code_dir)
    found = [
        str(p)
        for p in sorted(folder.iterdir())
        if (p.suffix == ".py" and p.is_file()) or (p.is_dir() and (p / "__init__.py").is_file())
    ]
    return found or None


def log_model(uri: str, run_id: str, net: Any, example: Any, code_dir: str | None = None) -> None:
    """Log ``net`` (from :func:`trained_network`) as an MLflow PyTorch model in ``run_id``, with
    ``example`` inputs (a few rows) and the signature they give when there are any (and the
    network takes them); the modules of ``code_dir``, the user's code, go with it.
    ``mlflow.pytorch.load_model("runs:/<run_id>/model")`` loads it (with ``dropout-hpo``
    installed). The whole module is pickled rather than exported, so its dropout layers can be
    switched on again for Monte-Carlo dropout. Nothing here draws random numbers, and
    ``start_run`` is thread-local in MLflow, so this is safe in the tracker's thread."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from hpo.models.module import logits_of

    signature = None
    if example is not None:
        example = example.numpy()
        try:
            with torch.inference_mode():
                output = net(torch.as_tensor(example))
            signature = infer_signature(example, logits_of(output).float().numpy())
        except Exception:
            example, output = None, None
        if not isinstance(output, torch.Tensor):
            example = None  # MLflow checks an input example by serving it, which needs a tensor output
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format notice, every time
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            net,
            name="model",
            input_example=example,
            signature=signature,
            serialization_format="pickle",
            code_paths=code_paths(code_dir),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "dropout-hpo"],
        )


def attach_best_model(
    mlflow_client: MlflowClient,
    uri: str,
    parent_id: str,
    run_id: str,
    net: Any,
    example: Any,
    end_ms: int | None,
    code_dir: str | None = None,
) -> None:
    """Log a best trial's network (with the user's code in ``code_dir``) into its (complete)
    run, close the run again at the trial's own end time (``end_ms``; logging reopens it), and
    point the study run's ``hpo.best_model`` tag at the model."""
    log_model(uri, run_id, net, example, code_dir)
    mlflow_client.set_terminated(run_id, status="FINISHED", end_time=end_ms)
    log_to_run(mlflow_client, parent_id, tags={BEST_MODEL_TAG: f"runs:/{run_id}/model"})


def model_uri(handle: StudyHandle, settings: Tracking, number: int) -> str | None:
    """``runs:/…/model`` of trial ``number`` when the tracker logged its network, else ``None``."""
    known = handle.study.user_attrs.get(PARENT_ATTR) or {}
    if not settings.enabled or known.get("uri") != redact(settings.resolved_uri):
        return None
    try:
        return best_model_of(client(settings), known["run_id"], number)
    except Exception:
        return None


def best_model_of(mlflow_client: MlflowClient, parent_id: str, number: int) -> str | None:
    """The model URI (``runs:/…/model``) the study run ``parent_id`` names as its best model
    (its ``hpo.best_model`` tag) when that is trial ``number``'s model, else ``None``."""
    uri = mlflow_client.get_run(parent_id).data.tags.get(BEST_MODEL_TAG, "")
    run_id = uri.removeprefix("runs:/").split("/")[0]
    if run_id and mlflow_client.get_run(run_id).data.tags.get(NUMBER_TAG) == str(number):
        return uri
    return None
