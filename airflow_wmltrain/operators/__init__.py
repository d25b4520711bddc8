"""Operators: one training run is one task (``TrainingRunOperator``)."""
