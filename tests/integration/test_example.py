"""``make demo``'s job as a test: the MNIST example trains in the real PyTorch image through Airflow.

It builds the image offline when missing (``images/build``, about two minutes on a bare machine), so the
suite runs real training code in a real container image, as the README's main job does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_mnist_example_trains_end_to_end_and_reports_its_accuracy(
    services: dict[str, str], tmp_path: Path
) -> None:
    subprocess.run(["make", "-s", "build/mnist-model.zip"], cwd=REPO_ROOT, check=True)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    match = re.search(r"Accuracy of the trained model on the test digits: ([0-9.]+)", output)
    assert match, output[-6000:]
    assert float(match.group(1)) > 0.85
    assert "COMPLETED" in output
    assert re.search(r"mnist-training-models/training-[A-Za-z0-9_-]+/model\.pt", output)
    assert re.search(r"training-[A-Za-z0-9_-]+/learner-1/training-log\.txt", output)


def test_the_readme_cli_quick_start_trains_the_example_on_the_services(
    services: dict[str, str], tmp_path: Path
) -> None:
    """README, "Quick start", on this repository's services: ``scripts/demo.py --prepare`` (the image on
    the stand-in GPU host too, the digits in the bucket), then ``wmltrain train ... --wait``: the run
    goes through the services' Airflow to the GPU host and completes (issue 13 item 7)."""
    import json

    subprocess.run(["make", "-s", "build/mnist-model.zip"], cwd=REPO_ROOT, check=True)
    env = {**os.environ, **services, "AIRFLOW_HOME": str(tmp_path / "airflow"), "WMLTRAIN_TOKEN_CACHE": ""}
    prepared = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--prepare"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert prepared.returncode == 0, (prepared.stdout + prepared.stderr)[-6000:]
    wmltrain = str(Path(sys.executable).parent / "wmltrain")
    trained = subprocess.run(
        [wmltrain, "train", "build/mnist-model.zip", "examples/mnist/manifest.yaml", "--wait", "--json",
         "--timeout", "900"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=960, check=False,
    )  # fmt: skip
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-6000:]
    run = json.loads(trained.stdout)
    assert run["state"] == "COMPLETED", run
    assert run["image"] == "airflow-wmltrain/pytorch:2.13-cpu", run
    assert run["results_location"].startswith("s3://mnist-training-models/training-"), run
