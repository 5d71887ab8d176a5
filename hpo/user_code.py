"""The user's own classes and callables, named by import path as LightningCLI names them:
``class_path`` plus ``init_args``, nested wherever an argument is itself an object
(``config: {class_path: transformers.BertConfig, init_args: {…}}``).

The user's code directory is put on ``sys.path`` first, so ``class_path: my_models.Net`` finds
``my_models.py`` beside the search space; Ray workers get the same directory shipped with the
job (:mod:`hpo.running.ray_executor`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hpo.errors import HpoError

#: Left out when a user's code folder is shipped to Ray workers or to a Ray job: stores,
#: artifacts and environments that often sit beside a search space.
CODE_EXCLUDES = [
    "*.db",
    "*.db-journal",
    "*.db-wal",
    "mlartifacts/",
    "mlruns/",
    "reports/",
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.ckpt",
    "*.pt",
    "*.pth",
    "lightning_logs/",
]


class UserCodeError(HpoError):
    """The user's class, callable or its arguments cannot be used; ``key`` is the spec key."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def add_code_dir(code_dir: str | Path | None) -> None:
    """Make modules in ``code_dir`` importable in this process (first on ``sys.path``)."""
    if code_dir is None:
        return
    folder = str(Path(code_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    importlib.invalidate_caches()


def locate(class_path: str, key: str = "class_path") -> Any:
    """The object ``class_path`` names (``package.module.Name``); :class:`UserCodeError` saying
    which part could not be found, and why."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name or not name:
        raise UserCodeError(key, f"{class_path!r} is not an import path (package.module.Name)")
    if module_name == "__main__":
        raise UserCodeError(
            key,
            f"{class_path!r} is defined in __main__, which Ray workers and a model loaded "
            "from MLflow cannot import: move it into a module file beside the search space",
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise UserCodeError(
            key,
            f"cannot import {module_name!r}: no module named {missing!r} (is the code directory right? see --code-dir)",
        ) from exc
    except Exception as exc:
        raise UserCodeError(key, f"importing {module_name!r} raised {type(exc).__name__}: {_first(exc)}") from exc
    try:
        return getattr(module, name)
    except AttributeError:
        raise UserCodeError(key, f"module {module_name!r} has no {name!r}") from None


def is_object(value: Any) -> bool:
    """Whether a spec value is a nested ``{class_path, init_args}`` object."""
    return isinstance(value, Mapping) and "class_path" in value and set(value) <= {"class_path", "init_args"}


def _names(target: Any) -> tuple[list[str], bool]:
    """The argument names ``target`` declares, and whether it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return [], False
    named = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return named, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _refusing_callee(exc: TypeError) -> Any:
    """The callable a ``**kwargs`` builder passed its arguments to and that refused one, found by
    the name its error gives (``EfficientNet.__init__() got …``) among the names of the frames
    that called it, innermost first (timm calls it as ``model_cls(**kwargs)``)."""
    match = re.match(r"([\w.]+?)(?:\.__init__)?\(\)", str(exc))
    if match is None:
        return None
    name = match.group(1).rsplit(".", 1)[-1]
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if callable(value) and getattr(value, "__name__", None) == name:
                return value
        if name in frame.f_globals:
            return frame.f_globals[name]
    return None


def _parameters(target: Any, exc: TypeError | None = None) -> str:
    """The argument names ``target`` takes, for an error message; for a builder that passes
    ``**kwargs`` on, those of the callable that refused one too."""
    named, forwards = _names(target)
    text = ", ".join(named) or "nothing"
    callee = _refusing_callee(exc) if forwards and exc is not None else None
    if callee is not None and callee is not target:
        passed, _ = _names(callee)
        text += f"; through **kwargs, {getattr(callee, '__name__', callee)}'s: {', '.join(passed) or 'nothing'}"
    return text if named or callee is not None else "?"


def instantiate(value: Any, key: str) -> Any:
    """Build ``value``: nested objects first, then the call itself. ``key`` names ``value`` in
    errors (``model``, ``model.init_args.config``)."""
    if isinstance(value, list):
        return [instantiate(v, f"{key}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        return value
    if not is_object(value):
        return {k: instantiate(v, f"{key}.{k}") for k, v in value.items()}
    target = locate(value["class_path"], f"{key}.class_path")
    if not callable(target):
        raise UserCodeError(f"{key}.class_path", f"{value['class_path']!r} is not a class or a function")
    arguments = {k: instantiate(v, f"{key}.init_args.{k}") for k, v in (value.get("init_args") or {}).items()}
    try:
        return target(**arguments)
    except TypeError as exc:
        if re.search(
            r"unexpected keyword argument|missing \d+ required|required (keyword|positional) argument", str(exc)
        ):
            raise UserCodeError(f"{key}.init_args", f"{_first(exc)}; it takes: {_parameters(target, exc)}") from exc
        raise UserCodeError(key, f"{value['class_path']}(…) raised TypeError: {_first(exc)}") from exc
    except Exception as exc:
        raise UserCodeError(key, f"{value['class_path']}(…) raised {type(exc).__name__}: {_first(exc)}") from exc


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


class _FirstTime(logging.Filter):
    """Passes a log record the first time its logger and message are seen in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_FIRST_LOG = _FirstTime()
_SEEN_WARNINGS: set[tuple[type, str]] = set()


@contextlib.contextmanager
def said_once() -> Iterator[None]:
    """Warnings and log lines the user's code gives while it runs inside this block, each shown
    once per process: a model is built for every trial and probed, and a third-party warning
    (PyTorch's one-layer RNN dropout, a tokenizer's token ids) is news only the first time."""
    loggers = [
        logging.getLogger(),
        *(logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)),
    ]
    handlers = {handler for logger in loggers for handler in logger.handlers}
    for handler in handlers:
        handler.addFilter(_FIRST_LOG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(_FIRST_LOG)
    for warning in caught:
        key = (warning.category, str(warning.message))
        if key not in _SEEN_WARNINGS:
            _SEEN_WARNINGS.add(key)
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
