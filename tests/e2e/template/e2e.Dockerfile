# The template the end-to-end tests build once per run: the local Debian base (python3 is in
# it) plus a file and a web page. No package downloads, so it builds in seconds once the base exists.
FROM debian:bookworm
RUN ln -sf python3 /usr/bin/python && mkdir -p /srv/www && echo "hello from the template" > /srv/www/index.html \
 && echo "built-by-dockerfile" > /etc/trenvx-e2e
