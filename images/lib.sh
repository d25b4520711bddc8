# shellcheck shell=bash
# What the offline image builders share (sourced by images/build and images/stack/build): messages, a
# quiet runner, the Debian rootfs made with mmdebstrap and imported, and wheels downloaded on the host.
# The sourcing script sets PROG (its name in messages) and `set -euo pipefail`.
#
# Environment: WMLTRAIN_IMAGES_CACHE (default /var/tmp/wmltrain-images), DEBIAN_MIRROR (default
# http://deb.debian.org/debian).

SUITE=bookworm # Debian 12: its python3 is CPython 3.11.2
CACHE=${WMLTRAIN_IMAGES_CACHE:-/var/tmp/wmltrain-images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# pip's target for wheels that run in those images, whatever the host runs: CPython 3.11 on x86_64.
WHEEL_TARGET=(--only-binary=:all: --python-version 3.11.2 --implementation cp --abi cp311
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --disable-pip-version-check)

note() { printf '%s: %s\n' "$PROG" "$*"; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

_quiet_log=$(mktemp)
trap 'rm -f "$_quiet_log"' EXIT
# Run a command with its output kept aside, shown only when it fails.
quiet() {
    if ! "$@" >"$_quiet_log" 2>&1 </dev/null; then
        printf '%s: failed: %s\n' "$PROG" "$*" >&2
        tail -n 60 "$_quiet_log" >&2
        exit 1
    fi
}
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
describe() { docker image inspect --format '{{.Id}} {{.Size}}' "$1" | awk '{printf "%s, %.0f MB", substr($1, 8, 12), $2 / 1e6}'; }

require_docker() {
    command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed"
    docker info >/dev/null 2>&1 ||
        die "no Docker daemon at ${DOCKER_HOST:-the default socket} (for this repo's: scripts/services up; eval \"\$(scripts/services env)\")"
}

# make_rootfs TAR PACKAGE,PACKAGE,... [MMDEBSTRAP-OPTION...]: a Debian $SUITE minbase rootfs with those
# packages, made by mmdebstrap (installed with apt-get when missing) into TAR unless TAR exists. Docs,
# man pages and translations are left out (the images are for running code, not reading it).
make_rootfs() {
    local rootfs=$1 include=$2
    shift 2
    [ -s "$rootfs" ] && return
    if ! command -v mmdebstrap >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "mmdebstrap is missing and installing it needs root (apt-get install mmdebstrap)"
        note "installing mmdebstrap (apt-get)"
        quiet apt-get update -qq
        DEBIAN_FRONTEND=noninteractive quiet apt-get install -y -qq --no-install-recommends mmdebstrap
    fi
    [ "$(id -u)" = 0 ] || die "mmdebstrap's root mode needs root"
    mkdir -p "$(dirname "$rootfs")"
    local partial=${rootfs%.tar}.partial.tar
    rm -f "$partial"
    # The hook's $1 (the rootfs) is mmdebstrap's to expand, hence the single quotes.
    # shellcheck disable=SC2016
    quiet mmdebstrap --quiet --variant=minbase --include="$include" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$@" "$SUITE" "$partial" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $MIRROR-security $SUITE-security main"
    mv "$partial" "$rootfs"
}

# import_rootfs TAR IMAGE MESSAGE: the rootfs as a Docker image (PATH, LANG, CMD bash).
import_rootfs() {
    quiet docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "$3" \
        "$1" "$2"
}

# download_pinned_wheels DIR REQUIREMENTS: the wheels of a fully pinned requirements file (the whole
# closure, so nothing is resolved again: --no-deps) for the images' python, into DIR.
download_pinned_wheels() {
    mkdir -p "$1"
    grep -v -e '^#' -e '^$' -e '^ *#' "$2" | sed 's/ *#.*//; s/ *\\$//' | grep -v '^ *$' >"$1/.pins.txt"
    quiet python3 -m pip download --quiet --no-deps "${WHEEL_TARGET[@]}" -d "$1" -r "$1/.pins.txt"
    rm -f "$1/.pins.txt"
}
