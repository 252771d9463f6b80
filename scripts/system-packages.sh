#!/usr/bin/env bash
# The system packages the sandbox and the browser test use: bubblewrap (cells' file system and network
# isolation) and chromium (JupyterLab in a headless browser). Installs them with apt where it can (root on
# Debian/Ubuntu), otherwise says what to install. Never fails: without them depin still works (the sandbox
# falls back to a separate user; `depin doctor` says what is missing) and the tests that need them skip,
# naming the package.
set -uo pipefail
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages: bubblewrap and chromium are installed"
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "system packages: installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
        || echo "system packages: apt-get could not install ${missing[*]}; install them yourself"
    exit 0
fi
echo "system packages: ${missing[*]} not installed. As root: apt-get install ${missing[*]} (Debian/Ubuntu)," \
     "dnf install ${missing[*]} (Fedora); depin runs without them, and the tests that need them skip."
exit 0
