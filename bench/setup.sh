#!/usr/bin/env bash
# Install the peer servers the benchmark compares kvd with: Redis behind
# webdis, and etcd (its v3 JSON gateway). Debian packages, so this needs root
# and apt-get; without them it prints a note and exits 0, and `make bench`
# skips the missing peers. Already-installed binaries are left alone.
set -u

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v webdis >/dev/null 2>&1 || missing+=(webdis)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)

if [ ${#missing[@]} -eq 0 ]; then
    echo "bench/setup.sh: redis-server, webdis and etcd are installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
    echo "bench/setup.sh: note: cannot install ${missing[*]} (needs root and apt-get);" \
         "the benchmark will skip those peers"
    exit 0
fi

echo "bench/setup.sh: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq; then
    echo "bench/setup.sh: note: apt-get update failed; the benchmark will skip missing peers"
    exit 0
fi
# Debian's packages start their daemons on install (redis on port 6379, etcd
# on 2379) when an init system runs; a policy-rc.d that exits 101 tells
# invoke-rc.d not to. The benchmark starts its own instances on free ports.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
# One package at a time, so one that is unavailable does not stop the others.
for package in "${missing[@]}"; do
    if ! apt-get install -y -qq --no-install-recommends "$package" >/dev/null; then
        echo "bench/setup.sh: note: could not install $package; the benchmark will skip it"
    fi
done
exit 0
