# The default sandbox: Debian bookworm with python3 and what an agent reaches for, like E2B's base
# image: git, sudo, curl, ca-certificates. `debian:bookworm` resolves to the local base image
# trenvx makes with debootstrap when no registry is reachable.
# Every build adds the account `user` (uid 1000, home /home/user, bash, passwordless sudo), which
# commands and file calls run as by default (`user = "user"` in example_config.toml): see
# src/trenvx/template/accounts.py.
# openssh-server: `ssh root@<sandbox-id>` (sandbox-cli ssh-config). No sshd runs until the first ssh
# into a sandbox starts one (src/trenvx/guest/sshd_setup.py) with a host key of that sandbox's own:
# the keys the package makes at install would be every sandbox's, so they are removed here.
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python-is-python3 python3-pip procps ca-certificates curl git sudo less openssh-server \
 && rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub \
 && rm -rf /var/lib/apt/lists/*
