# The default sandbox: Debian bookworm with python3 and the basic tools an agent reaches for.
# `debian:bookworm` resolves to the local base image trenvx makes with debootstrap when no
# registry is reachable.
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python-is-python3 python3-pip procps ca-certificates curl less \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /root
