"""Operator extra links: the results of a training run in its bucket."""
