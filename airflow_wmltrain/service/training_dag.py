"""The bundled training DAG: one training run from a DAG run's ``conf`` (what ``wmltrain train`` submits).

Triggered from the Airflow UI, it shows a form: the manifest as YAML text, the model definition (an
object-store URL such as ``s3://bucket/model.zip``, or the zip as ``base64:<data>``) and the
hyperparameters.  The DAG run id is the training id when it looks like one (``training-...``, as
``wmltrain train`` names its runs); a run started from the UI with Airflow's own run id gets an id
derived from it.  Use connection ids in manifests submitted here: a DAG run's ``conf`` is shown by the
UI and the API (``wmltrain train`` moves inline credentials into Airflow connections for that reason).

Whoever may trigger this DAG is a submitter, not a DAG author: the conf's values are data, never paths of
the worker (the manifest is YAML text, the model definition a URL or ``base64:``), a manifest may only
name the connections ``[wmltrain] submission_connections`` allows (and those ``wmltrain train`` made of
the run's own inline credentials), and a training id of another task instance is refused (C105).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow_wmltrain.service.runs import SERVER_FACTS_KEY, TRAINING_DAG_ID

MANIFEST_HELP = (
    "The training manifest (YAML): model_definition (name, framework, execution.command, "
    "execution.resource), training_data_reference and training_results_reference. Give credentials as "
    "connection: {conn_id: ...}, a connection that [wmltrain] submission_connections allows. YAML text "
    "only: never the path of a file."
)
MODEL_HELP = (
    "The model-definition zip: an object-store URL (s3://bucket/model.zip or swift://container/model.zip, "
    "read with the manifest's credentials), or base64:<the zip's bytes in base64>."
)


def published_facts(settings: Any) -> dict[str, Any]:
    """What ``wmltrain train`` checks a submission against, from this server's settings
    (:class:`~airflow_wmltrain.service.runs.ServerFacts`): the framework registry and the resource
    classes, published in the ``manifest`` parameter's schema under :data:`SERVER_FACTS_KEY`."""
    from airflow_wmltrain.frameworks import FrameworkRegistry

    return {
        "frameworks": FrameworkRegistry.from_settings(settings).to_data(),
        "resource_classes": dict(settings.resource_classes),
    }


def build_training_dag(dag_id: str = TRAINING_DAG_ID, **operator_kwargs: Any) -> Any:
    """The training DAG.

    :param dag_id: its id.
    :param operator_kwargs: extra ``TrainingRunOperator`` arguments (``docker_url``, ``network_mode``,
        ``shm_size``, ``deferrable``, ``retries``...); ``docker_url`` defaults to ``$WMLTRAIN_DOCKER_URL``
        and ``network_mode`` to ``$WMLTRAIN_NETWORK_MODE`` when those are set, ``retries`` and
        ``retry_delay`` to ``[wmltrain] training_retries`` / ``training_retry_delay``: a retry re-attaches
        to the run's container (same training id), so a killed worker does not lose the run.
    """
    from airflow.sdk import DAG, Param

    from airflow_wmltrain.operators.training_run import TrainingRunOperator
    from airflow_wmltrain.settings import Settings

    settings = Settings.from_airflow_config()
    # The manifest parameter's schema also says what the server checks a submission against.
    facts: dict[str, Any] = {SERVER_FACTS_KEY: published_facts(settings)}
    defaults: dict[str, Any] = {
        "retries": settings.training_retries,
        "retry_delay": timedelta(seconds=settings.training_retry_delay),
    }
    if os.environ.get("WMLTRAIN_DOCKER_URL"):
        defaults["docker_url"] = os.environ["WMLTRAIN_DOCKER_URL"]
    if os.environ.get("WMLTRAIN_NETWORK_MODE"):
        defaults["network_mode"] = os.environ["WMLTRAIN_NETWORK_MODE"]
    with DAG(
        dag_id=dag_id,
        description="One training run: a model-definition zip and a training manifest (wmltrain train)",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        tags=["wmltrain"],
        render_template_as_native_obj=True,
        params={
            "manifest": Param(
                "",
                type="string",
                format="multiline",
                title="Training manifest (YAML)",
                description=MANIFEST_HELP,
                **facts,
            ),
            "model_definition": Param("", type="string", title="Model definition", description=MODEL_HELP),
            "hyperparameters": Param(
                {},
                type="object",
                title="Hyperparameters",
                description='Overrides of the command\'s options, e.g. {"learningRate": 0.01}',
            ),
        },
        doc_md=__doc__,
    ) as dag:
        TrainingRunOperator(
            task_id="train",
            manifest="{{ params.manifest }}",
            model_definition="{{ params.model_definition }}",
            hyperparameters="{{ params.hyperparameters }}",
            training_id="{{ run_id if run_id.startswith('training-') else '' }}",
            submitted_inputs=True,
            **{**defaults, **operator_kwargs},
        )
    return dag
