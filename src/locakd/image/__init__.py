"""The image-classification pipeline (``locakd train-teacher`` / ``distill`` / ``summarize``).

* :mod:`~locakd.image.config` -- :class:`ImageExperimentConfig`, one YAML file per experiment;
* :mod:`~locakd.image.trainer` -- :func:`train_teacher`, :func:`distill` (epoch step + evaluation on
  top of :mod:`locakd.engine`);
* :mod:`~locakd.image.evaluate` -- top-k accuracy, exact under DDP sharding;
* :mod:`~locakd.image.summarize` -- mean +- std over seeds of finished runs.

Modules are imported explicitly (``import locakd.image`` loads nothing heavy).
"""
