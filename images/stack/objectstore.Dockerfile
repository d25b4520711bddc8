# The stack's object store: OpenStack Swift from Debian 12's packages with its S3 API (s3api) and
# tempauth, configured by the functions of scripts/services that configure the test services' Swift
# (one configuration, two homes: there the loopback test service, here a container).
# Tagged airflow-wmltrain/objectstore:swift-bookworm; built by images/stack/build (--network none): the
# context holds scripts/services, scripts/swift_aio.py and images/stack/objectstore.
ARG BASE=airflow-wmltrain/bookworm:stack
FROM ${BASE}
COPY services swift_aio.py /opt/wmltrain/scripts/
COPY objectstore /opt/wmltrain/objectstore
ENV WMLTRAIN_SERVICES_DIR=/srv/wmltrain-store \
    WMLTRAIN_SWIFT_PORT=8080 \
    WMLTRAIN_SWIFT_BIND_IP=0.0.0.0
VOLUME /srv/wmltrain-store
EXPOSE 8080
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/opt/wmltrain/objectstore"]
