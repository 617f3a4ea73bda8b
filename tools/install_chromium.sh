#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the search-page screenshot test (tests/test_search_html.py).
# Idempotent: does nothing when /usr/bin/chromium already exists. Needs root (CI runs as root) and the Debian
# package registry; it never downloads a browser build from anywhere else.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install_chromium.sh: /usr/bin/chromium is missing and this is not root; install Debian's 'chromium'" \
         "package by hand (apt-get install chromium)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install_chromium.sh: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
