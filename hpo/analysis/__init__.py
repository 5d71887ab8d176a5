"""After (or during) a study: trial tables for export (:mod:`~hpo.analysis.export`), reports
and comparisons (:mod:`~hpo.analysis.report`) made of tables (:mod:`~hpo.analysis.tables`),
figures (:mod:`~hpo.analysis.plots`) and their Markdown or HTML (:mod:`~hpo.analysis.rendering`),
the best network and its re-training (:mod:`~hpo.analysis.best_model`) and Monte-Carlo dropout
(:mod:`~hpo.analysis.uncertainty`)."""
