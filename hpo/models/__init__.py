"""Models and their dropout sites: the dropout variants and max-norm (:mod:`~hpo.models.dropout`),
the built-in networks (:mod:`~hpo.models.nets`), the LightningModule that trains a plain network
(:mod:`~hpo.models.module`), and for the user's own models the dropout sites found in them
(:mod:`~hpo.models.sites`), the groups a search space makes of them (:mod:`~hpo.models.groups`)
and the trial's model built from them (:mod:`~hpo.models.user_model`).

Nothing here knows of studies, Ray or MLflow."""
