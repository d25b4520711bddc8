# The stack's Airflow base image built without a registry, tagged apache/airflow:3.3.2-python3.11 so that
# the repository's Dockerfile (FROM ${AIRFLOW_IMAGE}) and docker-compose.yaml use it as they would use
# the official image. Built by images/stack/build: the context is the folder of the wheels of
# requirements.txt (downloaded on the host) plus the entrypoint; nothing here touches the network.
# What it shares with the official image: user airflow (uid 50000, gid 0), AIRFLOW_HOME=/opt/airflow,
# Airflow on PATH from /home/airflow/.local/bin, AIRFLOW_VERSION, `pip install` as the airflow user,
# and an entrypoint that runs `bash ...`/`python ...` as given and anything else as an airflow command.
ARG BASE=airflow-wmltrain/bookworm:stack

# Stage 1: a venv with the wheels (Debian's pip refuses installs into the system python, PEP 668).
# The wheels stay in this stage.
FROM ${BASE} AS venv
LABEL airflow-wmltrain.stage=venv
COPY . /tmp/wheels/
RUN python3 -m venv /home/airflow/.local \
 && /home/airflow/.local/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/wheels -r /tmp/wheels/requirements.txt \
 && /home/airflow/.local/bin/python -c "import airflow, airflow.providers.celery, airflow.providers.postgres, airflow.providers.docker, airflow.providers.amazon; print('airflow', airflow.__version__)"

# Stage 2: the base, the user, the venv (at the same path: its absolute links and shebangs hold).
FROM ${BASE}
ARG AIRFLOW_VERSION=3.3.2
RUN useradd --uid 50000 --gid 0 --home-dir /home/airflow --shell /bin/bash airflow \
 && install -d -o 50000 -g 0 -m 775 /home/airflow /opt/airflow /opt/airflow/dags /opt/airflow/logs \
        /opt/airflow/plugins /opt/airflow/config
COPY --from=venv --chown=50000:0 /home/airflow/.local /home/airflow/.local
COPY airflow-entrypoint /entrypoint
ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW_VERSION=${AIRFLOW_VERSION} \
    AIRFLOW_USER_HOME_DIR=/home/airflow \
    VIRTUAL_ENV=/home/airflow/.local \
    PATH=/home/airflow/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
LABEL org.opencontainers.image.title="Apache Airflow ${AIRFLOW_VERSION} on Debian 12 (offline build of airflow-wmltrain's images/stack)"
USER 50000
WORKDIR /opt/airflow
EXPOSE 8080
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/entrypoint"]
CMD []
