"""Learned output-length predictors: labels from the served model, rankers, baselines, probe."""
