#!/usr/bin/env bash
# Bootstrap a Debian/Ubuntu host for busted, then run a job.
#
#   ./bootstrap.sh            bootstrap only
#   ./bootstrap.sh lab        bootstrap, then the main job: a lab with demo LLM traffic, monitored
#   ./bootstrap.sh test       bootstrap, then ruff, mypy and the whole test suite (what .ci/run calls)
#   ./bootstrap.sh -- CMD...  bootstrap, then run CMD inside the venv
#
# Idempotent: a second run checks each step and changes nothing that is already right.
# Needs root (apt, /lib/modules links, tracefs mount). Prints every change it makes.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
say() { printf 'bootstrap: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    say "must run as root (it installs packages and loads BPF); try: sudo $0 $*" >&2
    exit 1
fi

# 1. Debian packages. bcc is not on PyPI; python3-bpfcc is built for /usr/bin/python3.
pkgs=(python3-bpfcc bpfcc-tools bpftool python3-venv iproute2 curl openssl gnutls-bin dnsutils)
# Test-only packages: the web page's tests drive Debian's chromium headless (Playwright never
# downloads a browser here); gcc builds test libraries (tests/unit/test_tlslibs.py) and a spawner.
[ "${1:-}" = test ] && pkgs+=(chromium gcc)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
release=$(uname -r)
have_headers() { [ -e "/lib/modules/$release/build/include/generated/autoconf.h" ] || [ -e "/lib/modules/$release/build/include/config/auto.conf" ] || [ -e "/lib/modules/$release/build/Makefile" ]; }
if ! have_headers; then
    # Prefer the exact headers; fall back to the distribution's generic ones below.
    if apt-cache policy "linux-headers-$release" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        missing+=("linux-headers-$release")
    else
        dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" \
            || missing+=(linux-headers-amd64)
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi

# 2. Kernel headers for BCC. With no headers for this exact kernel, link the newest installed
#    generic ones. That is only sound because busted's BPF reads no kernel-internal struct (rule R0).
if have_headers; then
    hdr_real=$(readlink -f "/lib/modules/$release/build")
    case "$hdr_real" in
        *"$release"*) say "kernel headers for $release: $hdr_real" ;;
        *) say "kernel headers for $release: LINKED to $hdr_real (another version; sound because busted's BPF reads no kernel-internal struct)" ;;
    esac
else
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    common=${hdr%-amd64}-common
    if [ -z "$hdr" ] || [ ! -d "$common" ]; then
        say "no kernel headers for $release and no linux-headers-*-amd64 to link; install linux-headers-$release" >&2
        exit 1
    fi
    mkdir -p "/lib/modules/$release"
    ln -sfn "$hdr" "/lib/modules/$release/build"
    ln -sfn "$common" "/lib/modules/$release/source"
    say "no headers for kernel $release: LINKED /lib/modules/$release/build -> $hdr and source -> $common"
fi

# 3. tracefs (tracepoints attach through it).
if [ -e /sys/kernel/tracing/events ] || [ -e /sys/kernel/debug/tracing/events ]; then
    say "tracefs mounted"
else
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || mount -t debugfs none /sys/kernel/debug
    say "mounted tracefs"
fi

# 4. venv from the system python (bcc lives in its dist-packages), then the package.
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    say "created venv $venv (system site packages, for bcc)"
fi
stamp="$venv/.busted-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log="$venv/pip-install.log"
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip && \
           "$venv/bin/python" -m pip install -q -e ".[dev,lab,metrics,otlp,ui]"; } >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        say "pip install failed; full log in $log" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
    say "installed busted (editable) with dev extras into $venv"
else
    say "busted already installed in $venv"
fi
"$venv/bin/python" -c "import bcc, busted" || { say "bcc or busted not importable from the venv" >&2; exit 1; }

export PATH="$venv/bin:$PATH"
case "${1:-}" in
    "") ;;
    lab) shift; exec busted lab "$@" ;;
    test) shift
          say "ruff check (lint)"
          python -m ruff check . || { say "ruff found problems (above); fix them or run 'ruff check --fix .'" >&2; exit 1; }
          say "mypy (types; configured in pyproject.toml, [tool.mypy])"
          python -m mypy \
              || { say "mypy found type errors (above)" >&2; exit 1; }
          exec python -m pytest -q -p no:cacheprovider "$@" ;;
    --) shift; exec "$@" ;;
    *) say "unknown job '$1' (use: lab | test | -- CMD)" >&2; exit 2 ;;
esac
