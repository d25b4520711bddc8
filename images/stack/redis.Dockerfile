# Redis 7.0 from Debian 12's packages, tagged redis:7.0-bookworm and used the way docker-compose.yaml
# uses the official image (the Celery broker: no persistence needed, redis-cli on PATH).
# Built by images/stack/build (--network none).
ARG BASE=airflow-wmltrain/bookworm:stack
FROM ${BASE}
RUN install -d -o redis -g redis -m 750 /data
WORKDIR /data
USER redis
EXPOSE 6379
# Every interface of the container (its network is the stack's), no protected mode: as the official image.
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data"]
