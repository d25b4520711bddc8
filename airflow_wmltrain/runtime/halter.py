"""``python -m airflow_wmltrain.runtime.halter``: halt a run from a detached process.

A task being stopped by Airflow gets a few seconds between SIGTERM and SIGKILL, not enough to stop a
training container gracefully and store its logs; its ``on_kill`` starts this process (in its own
session, so it outlives the task) with :func:`~airflow_wmltrain.runtime.run.halt_run`'s parameters as
JSON on stdin (never on the command line: the manifest may hold credentials).
"""

from __future__ import annotations

import json
import logging
import sys


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    params = json.load(sys.stdin)
    from airflow_wmltrain.runtime.run import halt_run

    try:
        result = halt_run(**params)
    except Exception:
        logging.getLogger(__name__).exception("Halting training run %s failed", params.get("training_id"))
        return 1
    logging.getLogger(__name__).info("Training run %s is %s", result["training_id"], result["state"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
