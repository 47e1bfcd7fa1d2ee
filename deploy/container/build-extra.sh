#!/usr/bin/env bash
# Fills deploy/build-extra/ from this host for `docker build`: its CA bundle (for a TLS-inspecting proxy) and the
# wheels of its pip find-links folders (the local torch CPU wheel). Without them the image builds from PyPI alone.
set -euo pipefail
extra=$(dirname "$0")/../build-extra
bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [[ -f $bundle ]]; then cp "$bundle" "$extra/host-ca.crt"; fi
for dir in $(${PIP:-pip} config list 2>/dev/null | sed -n "s/^[a-z:.]*find-links='\(.*\)'$/\1/p" | sort -u) ${PIP_FIND_LINKS:-}; do
    [[ -d $dir ]] || continue
    for wheel in "$dir"/*.whl; do
        if [[ -e $wheel ]] && ! cmp -s "$wheel" "$extra/$(basename "$wheel")"; then cp "$wheel" "$extra/"; fi
    done
done
ls "$extra"
