# Sourced by the install-* scripts: install Debian packages without letting
# their services start, and stop services a package (or a boot) started.
# Both write what apt and the init system say to "$LOG" (set by the caller).

POLICY=/usr/sbin/policy-rc.d

# apt_install PACKAGE...: install with apt-get, services kept from starting
# (policy-rc.d, the standard Debian hook; our own copy is removed after).
apt_install() {
    local own_policy=0 status=0
    if [[ ! -e "$POLICY" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update >>"$LOG" 2>&1 &&
        apt-get install -y --no-install-recommends "$@" >>"$LOG" 2>&1; } || status=$?
    [[ "$own_policy" -eq 1 ]] && rm -f "$POLICY"
    hash -r
    return "$status"
}

# stop_services SERVICE...: stop and disable; each step may legitimately
# fail (no init system, not running).
stop_services() {
    local svc
    for svc in "$@"; do
        if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
            systemctl stop "$svc" >>"$LOG" 2>&1 || true
            systemctl disable "$svc" >>"$LOG" 2>&1 || true
        else
            if command -v service >/dev/null 2>&1; then
                service "$svc" stop >>"$LOG" 2>&1 || true
            elif [[ -x "/etc/init.d/$svc" ]]; then
                "/etc/init.d/$svc" stop >>"$LOG" 2>&1 || true
            fi
            if command -v update-rc.d >/dev/null 2>&1; then
                update-rc.d "$svc" disable >>"$LOG" 2>&1 || true
            fi
        fi
    done
}
