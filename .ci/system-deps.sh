#!/usr/bin/env bash
# System binaries the cluster tests run for real: redis-server, nginx, envsubst (what the nginx image
# renders its templates with). Installs the missing ones with apt-get when it can (root or passwordless
# sudo), otherwise says what is missing. Without them the cluster tests FAIL in CI (CI set), skip elsewhere.
set -euo pipefail

declare -A package=([redis-server]=redis-server [nginx]=nginx [envsubst]=gettext-base)
missing=()
for bin in "${!package[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("${package[$bin]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "cluster tests need: ${missing[*]} (apt-get install -y ${missing[*]}); not root, not installing" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cluster tests need: ${missing[*]}; no apt-get here, install them yourself" >&2
    exit 0
fi
echo "installing ${missing[*]} for the cluster tests" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
