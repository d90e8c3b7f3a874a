# Prometheus from Debian's package, for hosts that cannot pull prom/prometheus from a registry: docker/check_image.py
# runs it next to the server, and docker-compose.yml uses it when PROMETHEUS_IMAGE names it.
#   docker build -f docker/prometheus.Dockerfile -t tptt-prometheus:debian --build-arg BASE_IMAGE=debian:bookworm-slim docker
# Same command-line flags as the published image (docker-compose.yml passes them).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
