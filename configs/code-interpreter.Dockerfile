# A code interpreter: the default sandbox plus a Jupyter kernel with numpy, pandas and matplotlib
# (Debian's packages) and bash_kernel (from PyPI; Debian has none; trenvx's builds mount the host's
# CA certificates at /run/trenvx/host-ca.crt, for hosts behind a TLS-inspecting proxy). trenvx's code-interpreter
# server (code_interpreter = true in the config) starts the Python kernel before the snapshot, so
# each sandbox's first cell answers at once. Commands and cells run as `user` (passwordless sudo).
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python-is-python3 python3-pip python3-numpy python3-pandas python3-matplotlib \
      python3-ipykernel python3-jupyter-client python3-pexpect procps ca-certificates sudo git curl \
 && pip3 install --no-cache-dir --break-system-packages \
      $(test -f /run/trenvx/host-ca.crt && echo --cert /run/trenvx/host-ca.crt) bash_kernel==0.10.0 \
 && python3 -m bash_kernel.install --sys-prefix \
 && rm -rf /var/lib/apt/lists/*
