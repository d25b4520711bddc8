# PostgreSQL 15 from Debian 12's packages, tagged postgres:15-bookworm and used the way
# docker-compose.yaml uses the official image: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB make the
# cluster on the first start, data in /var/lib/postgresql/data (a volume), pg_isready on PATH.
# Built by images/stack/build (--network none).
ARG BASE=airflow-wmltrain/bookworm:stack
FROM ${BASE}
COPY postgres-entrypoint /usr/local/bin/docker-entrypoint.sh
RUN install -d -o postgres -g postgres -m 2775 /var/run/postgresql \
 && install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
