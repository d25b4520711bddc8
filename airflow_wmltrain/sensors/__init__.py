"""Sensors: wait for training runs started elsewhere."""
