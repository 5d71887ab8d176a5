"""``python -m hpo``: the same as the ``hpo`` command."""

from hpo.cli import app

app()
