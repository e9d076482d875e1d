#!/bin/sh
# The official image's entrypoint, in short: options alone mean redis-server;
# as root, take /data and drop to user redis (for redis-sentinel too, whose
# config file must be writable: it records what it learns there).
set -eu
if [ "${1#-}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ] || [ "$1" = redis-sentinel ]; then
    server="$1"
    shift
    # The official image is built with protected mode off (clients come from
    # other containers); say it first and let the command's own options
    # override it. A config file must come first, though.
    if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
        set -- --protected-mode no "$@"
    fi
    set -- "$server" "$@"
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis:redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
