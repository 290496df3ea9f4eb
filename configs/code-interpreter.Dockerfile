# A code interpreter: the default sandbox plus numpy and pandas from Debian's packages.
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python-is-python3 python3-numpy python3-pandas procps ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /root
