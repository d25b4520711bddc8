"""``python -m airflow_wmltrain`` behaves as ``wmltrain``."""

from __future__ import annotations

import sys

from airflow_wmltrain.cli.main import main

sys.exit(main())
