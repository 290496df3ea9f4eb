# A code interpreter: the default sandbox plus numpy and pandas from Debian's packages.
# Its commands run as `user` (passwordless sudo), like the default sandbox's.
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python-is-python3 python3-numpy python3-pandas procps ca-certificates sudo \
 && rm -rf /var/lib/apt/lists/*
