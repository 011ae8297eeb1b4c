#!/usr/bin/env bash
# Install the Debian packages meshlens' tests and tools need, when missing. Idempotent; run as root.
# Daemons are not started by the packages (clickhouse-server and nginx would take ports
# 9000/8123/80, which collide with meshlens' defaults): tests start their own instances.
# Without root or apt-get it says what it could not install and exits 0: those tests skip.
set -euo pipefail

PACKAGES=(clickhouse-server clickhouse-client libpcap0.8 tshark nginx wrk iptables tcpdump curl iproute2 etcd-server etcd-client
  chromium nghttp2-client)  # nghttp2-client: h2load, for the tap's h2c tests; chromium: the console's browser tests (Playwright drives it; it never downloads one)
LOG=/tmp/meshlens-install-system.log
POLICY=/usr/sbin/policy-rc.d

installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-system: all ${#PACKAGES[@]} packages present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  why=$([ "$(id -u)" -ne 0 ] && echo "not root" || echo "no apt-get")
  echo "install-system: $why, could not install: ${missing[*]} (tests that need them will skip)"
  exit 0
fi

# Refuse service starts from maintainer scripts (invoke-rc.d honours exit 101),
# and remove the policy afterwards only if it is ours.
created_policy=0
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  created_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
# tshark asks whether non-root users may capture; answer no, without a prompt.
echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections

: >"$LOG"  # apt at -qq: errors and package names, no download lines
apt_get() { apt-get -qq -y -o DPkg::Lock::Timeout=300 "$@" >>"$LOG" 2>&1; }
if ! apt_get update || ! apt_get install --no-install-recommends "${missing[@]}"; then
  echo "install-system: apt-get failed installing ${missing[*]}: see $LOG" >&2
  exit 1
fi
echo "install-system: installed ${missing[*]} (log: $LOG)"
