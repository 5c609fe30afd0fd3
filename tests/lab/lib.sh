# Shared by tests/lab/build and tests/lab/run: where the lab's artefacts live and how they are keyed.
# shellcheck shell=bash

lab_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$lab_dir/../.." && pwd)
cache=${VFIOCAPS_LAB_CACHE:-/var/cache/vfiocaps-lab}
mirror=${VFIOCAPS_LAB_MIRROR:-http://deb.debian.org/debian}
suite=trixie

say() { printf 'lab: %s\n' "$*" >&2; }
die() { printf 'lab: error: %s\n' "$*" >&2; exit 2; }

# sha256 of the named files (content and name), short form.
hash_files() {
    local file
    for file in "$@"; do
        printf '%s\n' "${file#"$top"/}"
        cat "$file"
    done | sha256sum | cut -c1-16
}

# The guest image (rootfs, kernel, initrd, sample modules) is built from these files only.
image_key() {
    hash_files "$lab_dir/build" "$lab_dir/lib.sh" "$lab_dir/guest-packages" \
        "$lab_dir/compile-samples" $(find "$lab_dir/rootfs" -type f | LC_ALL=C sort) |
        sed "s/\$/-$suite/"
}

image_dir() { printf '%s/image-%s\n' "$cache" "$(image_key)"; }

# The Python requirements of the project (runtime and build backend), one per line, from
# pyproject.toml: the guest installs the project offline from wheels downloaded for them.
python_requirements() {
    /usr/bin/python3 - "$top/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    data = tomllib.load(f)
for req in [*data["build-system"]["requires"], *data["project"]["dependencies"], "wheel"]:
    print(req)
EOF
}

wheels_key() {
    local python_version=$1
    { hash_files "$lab_dir/build" "$lab_dir/lib.sh"; python_requirements; echo "$python_version"; } |
        sha256sum | cut -c1-16
}

wheels_dir() { printf '%s/wheels-%s\n' "$cache" "$(wheels_key "$1")"; }
