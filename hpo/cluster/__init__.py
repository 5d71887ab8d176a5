"""The service on a Ray cluster: a study's driver submitted as a Ray job (:mod:`hpo.cluster.jobs`),
and every study's state read from the job table and the study store together
(:mod:`hpo.cluster.board`)."""
