"""Running trials: the study store (:mod:`~hpo.running.study`), the driver that asks, runs and
tells (:mod:`~hpo.running.executor`), in this process or on Ray
(:mod:`~hpo.running.ray_executor`), one trial (:mod:`~hpo.running.trial`), vectorised groups
of trials (:mod:`~hpo.running.group`) and GPU packing (:mod:`~hpo.running.packing`).

This package imports nothing on its own, so the CLI's read-only verbs can use
:mod:`hpo.running.study` without torch."""
