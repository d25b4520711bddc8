"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_wmltrain import __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-wmltrain",
        "name": "WML Train",
        "description": "GPU deep-learning training runs (model zip + YAML training manifest) as "
        "Airflow tasks: data staged from S3 or OpenStack Swift, the framework's container run "
        "on a Docker host with the right GPUs, model and logs written back to the results bucket.\n",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "WML Train",
                "external-doc-url": "https://pypi.org/project/airflow-wmltrain/",
                "tags": ["software"],
            }
        ],
        "config": {
            "wmltrain": {
                "description": "Settings of the airflow-wmltrain provider (training runs on GPU hosts).",
                "options": {
                    "resource_classes": {
                        "description": "Resource classes a manifest's "
                        "``model_definition.execution.resource`` may name, with the number of GPUs each "
                        "gets, as ``name=gpus`` pairs.\n",
                        "type": "string",
                        "version_added": "0.1.0",
                        "example": "small=1,medium=2,large=4,xlarge=8",
                        "default": "small=1,medium=2,large=4",
                    },
                    "frameworks_file": {
                        "description": "A YAML file of frameworks (name -> version -> image) merged over the "
                        "registry shipped with the provider; see the README for its format.\n",
                        "type": "string",
                        "version_added": "0.1.0",
                        "example": "/opt/airflow/config/wmltrain-frameworks.yaml",
                        "default": None,
                    },
                    "frameworks": {
                        "description": "Frameworks given inline, as YAML or JSON in the same format as "
                        "``frameworks_file``; merged last.\n",
                        "type": "string",
                        "version_added": "0.1.0",
                        "example": '{"pytorch": {"2.13": {"image": "registry.example.com/pytorch:2.13"}}}',
                        "default": None,
                    },
                    "model_definition_max_bytes": {
                        "description": "Largest total uncompressed size of a model-definition zip, in bytes "
                        "(a guard against zip bombs).\n",
                        "type": "integer",
                        "version_added": "0.1.0",
                        "example": "1073741824",
                        "default": "1073741824",
                    },
                    "model_definition_max_entries": {
                        "description": "Largest number of entries in a model-definition zip.\n",
                        "type": "integer",
                        "version_added": "0.1.0",
                        "example": "10000",
                        "default": "10000",
                    },
                },
            }
        },
    }
