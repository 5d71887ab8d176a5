"""The study's preset view in MLflow's runs page: the page opens on the study's trials with the
objective and every searched dropout parameter as columns, best first, and a chart section of the
dropout parameters against the objective.

MLflow's UI keeps a shared view of its runs page (the "Share" button) as the experiment tag
``mlflow.sharedViewState.<key>`` and loads it when the address carries ``viewStateShareKey=<key>``.
The value is what the UI itself writes: ``{"name", "createdAt", "updatedAt", "state"}``, the
state being ``deflate;`` and the base64 of the zlib-compressed JSON of the search facets
(``searchFilter``, ``orderByKey``, ``orderByAsc``, …) and the page state (``selectedColumns``,
``compareRunCharts``, ``compareRunSections``, …). This format was read from the UI bundled with
MLflow 3.17 and checked there in headless Chromium (tests/test_dashboard_browser.py);
:data:`CHECKED` lists the versions it is written for, and any other falls back to the plain
address. Search settings in the address override a shared view, so the view's address carries
none. Whether the page shows the table or the charts is the address's ``compareRunsMode``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import zlib
from importlib import metadata
from typing import Any

from hpo.params import dropout_parameters, searched_parameters
from hpo.spec import Choice, FloatRange, IntRange, Spec

TAG_PREFIX = "mlflow.sharedViewState."
#: (major, minor) MLflow versions whose UI the view's format was checked on.
CHECKED: tuple[tuple[int, int], ...] = ((3, 17),)
#: The UI refuses to save a view longer than this (characters).
MAX_LENGTH = 20_000
#: Metrics that are whole-trial only, so they have no epoch curve to draw.
_WHOLE_TRIAL = ("gap",)
_SECTION = "hpo-dropout"


def view_key(study: str) -> str:
    """The share key of ``study``'s view: its name made URL-safe, and a hash of the name so two
    studies in one experiment never share one."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", study).strip("-")[:40]
    return f"hpo-{slug}-{hashlib.sha1(study.encode()).hexdigest()[:8]}"


def supported(version: str | None = None) -> bool:
    """Whether MLflow ``version`` (default: the installed one) is one the view's format was
    checked on."""
    parts = re.match(r"(\d+)\.(\d+)", version or metadata.version("mlflow"))
    return parts is not None and (int(parts[1]), int(parts[2])) in CHECKED


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def _card(uuid: str, kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "type": kind,
        "runsCountToCompare": 100,
        "metricSectionId": _SECTION,
        "deleted": False,
        "isGenerated": False,
        **fields,
    }


def _line(uuid: str, metric: str) -> dict[str, Any]:
    return _card(
        uuid,
        "LINE",
        metricKey=metric,
        selectedMetricKeys=[metric],
        xAxisKey="step",
        scaleType="linear",
        xAxisScaleType="linear",
        lineSmoothness=0,
        selectedXAxisMetricKey="",
        yAxisKey="metric",
        yAxisExpressions=[],
        ignoreOutliers=False,
        useGlobalXaxisKey=False,
        useGlobalLineSmoothing=False,
        range={},
    )


def view_state(spec: Spec, study: str, objective_prefix: str, study_tag: str, role_tag: str) -> dict[str, Any]:
    """The runs page's state for ``study``: its trial runs, best first on the first objective;
    columns for the objectives (``objective_prefix`` + metric), the best epoch, the test accuracy,
    the trial's state and baseline marker, and every searched dropout parameter; charts of the
    dropout parameters against the objective (parallel coordinates), of the objective against
    each searched rate (scatter), and of each objective's epoch curve."""
    objectives = [objective_prefix + o.metric for o in spec.objective]
    searched = searched_parameters(spec)
    dropout = dropout_parameters(spec)
    numeric = [
        name
        for name in dropout
        if isinstance(searched[name], (FloatRange, IntRange))
        or (
            isinstance(searched[name], Choice)
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in searched[name].choice if v is not None
            )
        )
    ]
    where = f"tags.`{role_tag}` = 'trial'" + ("" if "'" in study else f" and tags.`{study_tag}` = '{study}'")
    columns = (
        [_column("metrics", o) for o in objectives]
        + [_column("metrics", m) for m in ("best_epoch", "best/test_acc")]
        + [_column("tags", t) for t in ("hpo.state", "hpo.baseline")]
        + [_column("params", p) for p in dropout]
    )
    curves = [o.metric for o in spec.objective if o.metric not in _WHOLE_TRIAL] or ["val/acc"]
    charts = [
        _card("hpo-parallel", "PARALLEL", selectedParams=dropout, selectedMetrics=objectives[:1], showAllRuns=True)
    ]
    charts += [
        _card(
            f"hpo-scatter-{i}",
            "SCATTER",
            xaxis={"key": name, "type": "PARAM"},
            yaxis={"key": objectives[0], "type": "METRIC"},
        )
        for i, name in enumerate(numeric)
    ]
    charts += [_line(f"hpo-curve-{i}", metric) for i, metric in enumerate(curves)]
    return {
        "searchFilter": where,
        "orderByKey": _column("metrics", objectives[0]),
        "orderByAsc": spec.objective[0].direction == "minimize",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": columns,
        "runsHiddenMode": "SHOW_ALL",
        "isAccordionReordered": True,
        "compareRunSections": [
            {
                "uuid": _SECTION,
                "name": f"Dropout vs {spec.objective[0].metric}",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
                "columns": 2,
            }
        ],
        "compareRunCharts": charts,
        "hideEmptyCharts": True,
        "useGroupedValuesInCharts": True,
        "groupBy": None,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def tag_value(study: str, state: dict[str, Any], now_ms: int | None = None) -> str:
    """The experiment tag's value, as the UI's "Share" writes it: named for the study (the name
    the UI's list of views shows), the state compressed."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode(), 9)).decode()
    return json.dumps({"name": f"dropout-hpo: {study}", "createdAt": now, "updatedAt": now, "state": packed})


def read_state(value: str) -> dict[str, Any]:
    """The state a tag value holds (the inverse of :func:`tag_value`, for tests and checks)."""
    packed = json.loads(value)["state"]
    return json.loads(zlib.decompress(base64.b64decode(packed.removeprefix("deflate;"))))


def view_query(key: str, charts: bool = False) -> str:
    """The runs page's query for the view ``key``: no search settings (they would override it),
    MLflow's machine-learning pages, the table or the charts."""
    return f"viewStateShareKey={key}&workflowType=machine_learning" + ("&compareRunsMode=CHART" if charts else "")
