#!/bin/sh
# Install the gradserve server from a wheel into a virtual environment: what the container image
# runs at build time (deploy/Dockerfile), and what CI runs against a freshly built wheel
# (tests/e2e/test_deploy.py), so that the image's install is tested without a container daemon.
#
#   deploy/install.sh WHEEL [PREFIX] [EXTRA_PACKAGE...]
#
# PREFIX (default /opt/gradserve) is created as a virtual environment unless it is one already.
# EXTRA_PACKAGEs are installed beside the wheel, e.g. 'tensorflow[and-cuda]' for a GPU image.
# Installs PREFIX/bin/gradserve and PREFIX/bin/gradserve-healthcheck (exit 0 when SERVING).
set -eu

if [ $# -lt 1 ]; then
    echo "usage: $0 WHEEL [PREFIX] [EXTRA_PACKAGE...]" >&2
    exit 2
fi
wheel=$1
prefix=${2:-/opt/gradserve}
[ $# -ge 2 ] && shift 2 || shift 1
here=$(cd "$(dirname "$0")" && pwd)

[ -x "$prefix/bin/python" ] || python3 -m venv "$prefix"
"$prefix/bin/python" -m pip install --no-cache-dir --disable-pip-version-check "$wheel[server]" "$@"

# The health check runs with this environment's Python (grpcio-health-checking is in [server]).
sed "1s|.*|#!$prefix/bin/python|" "$here/healthcheck.py" > "$prefix/bin/gradserve-healthcheck"
chmod 0755 "$prefix/bin/gradserve-healthcheck"

# The entry point and its imports work (TensorFlow is imported by `serve` only, not here).
"$prefix/bin/gradserve" serve --help > /dev/null
echo "gradserve installed in $prefix"
