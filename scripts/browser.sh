#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the dashboard's browser test (tests/dashboard.rs),
# installed when missing (as root; about 350 MB). apt keeps the two versions in lockstep.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "Chromium is not installed and this is not root: apt-get install chromium chromium-driver" >&2
    exit 1
fi
echo "installing Chromium and ChromeDriver from Debian's packages" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
