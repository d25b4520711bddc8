# The Airflow image of docker-compose.yaml: Airflow with airflow-wmltrain installed from its wheel (never
# at start-up). Build the wheel first (scripts/stack-smoke does: uv build --wheel --out-dir dist), then
# `docker-compose build` (or: docker build -t airflow-wmltrain/airflow:0.1.0 .).
#
# AIRFLOW_IMAGE: the official image by default; a host without a registry builds a stand-in with the same
# name and conventions offline (images/stack/build). PIP_INSTALL_ARGS: --no-index there, where the base
# image already holds every dependency of the provider (images/stack/requirements.txt).
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}
ARG PIP_INSTALL_ARGS=""
COPY dist/ /tmp/dist/
# apache-airflow pinned to the image's version so that pip never up- or downgrades Airflow itself.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${PIP_INSTALL_ARGS} "apache-airflow==${AIRFLOW_VERSION}" /tmp/dist/airflow_wmltrain-*.whl \
 && python -c "import airflow_wmltrain.get_provider_info as p; print(p.get_provider_info()['package-name'])"
