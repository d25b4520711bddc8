"""The ``wmltrain`` command line."""
