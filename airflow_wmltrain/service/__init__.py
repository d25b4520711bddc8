"""The training service on top of Airflow: the REST API client, runs as Airflow sees them, the DAGs."""
