# The OpenTelemetry collector of docker-compose.yml. The upstream image holds the collector
# binary only (no shell, no HTTP client), so a container health check has nothing to run:
# this adds a static busybox, whose wget asks the health_check extension on port 13133.
FROM busybox:1.37-musl AS probe

FROM otel/opentelemetry-collector-contrib:0.120.0
COPY --from=probe /bin/busybox /busybox
