# shellcheck shell=bash
# Debian 12 host set-up shared by scripts/bootstrap (development, tests, the
# VM) and scripts/install (an edge host): the ONE list of apt packages and the
# kernel-header fallback for bcc. Source it; it defines functions and arrays
# only and changes nothing by itself.

# What an installed stockade needs at run time.
# shellcheck disable=SC2034  # used by the scripts that source this file
STOCKADE_RUNTIME_PACKAGES=(
    python3-bpfcc       # bcc: compiles and loads the XDP program (not the PyPI `bcc`)
    python3-venv        # the venv is made from the system Python
    linux-headers-amd64 # bcc compiles against kernel headers
    iproute2 bpftool xdp-tools   # operators inspect interfaces, maps and programs
    libmodsecurity3     # the proxy's WAF
    modsecurity-crs     # its rules and the scanner User-Agent list (anomaly rules)
)

# What the test suite, the lab and the demo need on top.
# shellcheck disable=SC2034
STOCKADE_DEV_PACKAGES=(
    nftables iputils-ping
    systemd             # systemd-analyze verifies the units (tests/install)
    shellcheck          # checks the shell scripts (tests/install)
    ruby                # `ruby -c` checks the Vagrantfile (tests/install)
    chromium            # headless: the status page in a browser (tests/integration)
    wrk                 # load generator: reload under load (tests/integration/test_reload_lab.py)
    redis-server        # cluster mode tests start their own (scripts/bootstrap stops the service)
    python3-matplotlib  # bench/plots.py draws the benchmark plots (tests/bench)
)

# Prints the packages of "$@" that are not installed, one a line.
stockade_missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || printf '%s\n' "$pkg"
    done
}

# Installs whichever of "$@" are missing; does nothing (no apt-get update)
# when all are there, so a re-run is quick. $1 names the caller for messages.
stockade_apt_ensure() {
    local who=$1
    shift
    local missing=()
    mapfile -t missing < <(stockade_missing_packages "$@")
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    printf '%s: installing apt packages: %s\n' "$who" "${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# bcc compiles against /lib/modules/$(uname -r)/build. When the running
# kernel ships no headers, link the newest installed linux-headers-* (the XDP
# program only uses the stable UAPI) and say so. $1 names the caller.
stockade_link_kernel_headers() {
    local who=$1
    local kdir build source_dir
    kdir="/lib/modules/$(uname -r)"
    if [ -e "$kdir/build/include" ]; then
        return 0
    fi
    build=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' -print 2>/dev/null \
        | sort -V | tail -n 1)
    if [ -z "$build" ]; then
        printf '%s: no kernel headers for %s and no linux-headers-* installed\n' \
            "$who" "$(uname -r)" >&2
        return 1
    fi
    source_dir="${build%-amd64}-common"
    mkdir -p "$kdir"
    ln -sfn "$build" "$kdir/build"
    if [ -d "$source_dir" ]; then
        ln -sfn "$source_dir" "$kdir/source"
    fi
    printf '%s: WARNING: no headers for kernel %s; linked %s (and %s) into %s\n' \
        "$who" "$(uname -r)" "$build" "$source_dir" "$kdir" >&2
}
