# The default sandbox: Debian bookworm with python3 and what an agent reaches for, like E2B's base
# image: git, sudo, curl, ca-certificates. `debian:bookworm` resolves to the local base image
# trenvx makes with debootstrap when no registry is reachable.
# Every build adds the account `user` (uid 1000, home /home/user, bash, passwordless sudo), which
# commands and file calls run as by default (`user = "user"` in example_config.toml): see
# src/trenvx/template/accounts.py.
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python-is-python3 python3-pip procps ca-certificates curl git sudo less \
 && rm -rf /var/lib/apt/lists/*
