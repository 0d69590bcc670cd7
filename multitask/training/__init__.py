"""Training: ``cv.run_cv`` trains a run's folds (``stage``, ``soft_targets``, ``extra_val``, ``evaluate``,
``checkpoints``; what they share: ``context``)."""
