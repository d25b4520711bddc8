"""Triggers: the deferred wait for a running training container."""
