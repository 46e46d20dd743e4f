#!/usr/bin/env bash
# Install what shieldproxy needs on Debian 12, as root. Safe to run again: it
# only installs what is missing.
set -euo pipefail

cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  iptables iproute2 tcpdump
  iperf3 redis-server socat
  libnetfilter-queue-dev build-essential pkg-config
  python3 python3-venv python3-dev
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup needs root: it installs Debian packages (run it with sudo)" >&2
  exit 1
fi

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The tests start their own redis-server in a lab namespace. Debian's package
  # also starts a system service, which nothing here needs.
  if [[ " ${missing[*]} " == *" redis-server "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now redis-server >/dev/null 2>&1 || true
  fi
fi

# The virtual environment is rebuilt when pyproject.toml changes.
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "creating the virtual environment in .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# CRIU 4.2+ and pycriu in .criu/, linked into .venv, so it runs after the venv.
scripts/criu.sh
