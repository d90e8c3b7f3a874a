# Redis from Debian's package, for hosts that cannot pull the `redis` image: docker/check_image.py --cluster runs it
# beside the cluster-mode server, and docker-compose.yml uses it when REDIS_IMAGE names it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6379
# A command, not an entrypoint, as in the published image: compose's `command: [redis-server, ...]` replaces it.
CMD ["redis-server", "--protected-mode", "no"]
