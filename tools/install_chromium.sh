#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the search page's screenshot test (tests/test_search.py), from the
# Debian package registry only. `make test` and .ci/run call it before the tests.
# - Idempotent and instant when a chromium binary is already there.
# - Never waits for input: as root it runs apt-get; otherwise only password-less sudo (`sudo -n`) is tried. apt's
#   network and lock waits are bounded, and the whole install is cut off after INSTALL_TIMEOUT_S (default 600).
# - When it cannot install it says why on stderr and exits 1; `make test` goes on and the test is skipped.
set -uo pipefail

say() { echo "install_chromium.sh: $*" >&2; }

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    say "no chromium and no apt-get (not Debian): install a chromium build by hand for the screenshot test"
    exit 1
fi
if [ "$(id -u)" = "0" ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    say "no chromium, and installing it needs root (no password-less sudo here): run" \
        "'apt-get install chromium' as root"
    exit 1
fi

limit="${INSTALL_TIMEOUT_S:-600}"
apt_options=(-qq -o Acquire::Retries=1 -o Acquire::http::Timeout=30 -o DPkg::Lock::Timeout=60)
export DEBIAN_FRONTEND=noninteractive
if ! timeout "$limit" "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" update; then
    say "apt-get update failed (no network to the Debian registry?); the screenshot test will be skipped"
    exit 1
fi
candidate=$(apt-cache policy chromium 2>/dev/null | awk '/Candidate:/ {print $2}')
if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    say "this system's package registry has no 'chromium' package (Ubuntu ships it as a snap): install it by hand"
    exit 1
fi
if ! timeout "$limit" "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" install -y \
        --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
    say "apt-get install chromium failed; the screenshot test will be skipped"
    exit 1
fi
say "installed $(chromium --version 2>/dev/null || echo chromium)"
