#!/usr/bin/env bash
# Builds one Debian package a model: inferd-model-NAME_<version>_all.deb, holding
# /usr/share/inferd/models.d/NAME/ (model.json and its files, as `inferd pack`
# writes them). The daemon's package (cargo deb, cross/build.sh) carries no model;
# a box installs only the models it runs, and upgrading one never touches the other.
#
#   scripts/package-models.sh [--out DIR] [--models models.json] [NAME ...]
#
# Default: every model of ./models.json (scripts/setup.sh fetches their files)
# into target/debian-models/. Model files are the same on every architecture
# (Architecture: all). Needs dpkg-deb and an inferd binary (target/release or
# target/debug, else `cargo build`).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=target/debian-models
REGISTRY=models.json
NAMES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --models) REGISTRY=$2; shift 2 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) NAMES+=("$1"); shift ;;
  esac
done

INFERD=${INFERD:-}
if [ -z "$INFERD" ]; then
  # The newest of the two builds.
  INFERD=$(ls -t target/release/inferd target/debug/inferd 2>/dev/null | head -1 || true)
fi
[ -n "$INFERD" ] || { cargo build --locked; INFERD=target/debug/inferd; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ ${#NAMES[@]} -eq 0 ]; then
  mapfile -t NAMES < <(python3 -c 'import json,sys; print("\n".join(m["name"] for m in json.load(open(sys.argv[1]))["models"]))' "$REGISTRY")
fi
mkdir -p "$OUT"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
for name in "${NAMES[@]}"; do
  pkg=inferd-model-$(echo "$name" | tr 'A-Z_' 'a-z-')
  root=$WORK/$pkg
  dest=$root/usr/share/inferd/models.d/$name
  mkdir -p "$root/DEBIAN" "$(dirname "$dest")"
  "$INFERD" pack "$name" "$dest" --models "$REGISTRY" >/dev/null
  description=$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print(e.get("description") or e["task"])' "$dest/model.json")
  size=$(du -k -s "$root/usr" | cut -f1)
  cat > "$root/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $VERSION-1
Architecture: all
Maintainer: The inferd developers <inferd@localhost>
Section: misc
Priority: optional
Depends: inferd (>= $VERSION)
Installed-Size: $size
Description: inferd model '$name'
 $description
 .
 Installs /usr/share/inferd/models.d/$name/ (its registry entry and files,
 every sha256 in the entry); inferd serves it after the reload this package
 asks for. Removing the package takes the model away the same way.
CONTROL
  for script in postinst postrm; do
    cat > "$root/DEBIAN/$script" <<'SCRIPT'
#!/bin/sh
set -e
# A running inferd reads its registry again (the model joins, or leaves).
if [ -d /run/systemd/system ] && systemctl is-active --quiet inferd.service; then
  systemctl reload inferd.service || true
fi
SCRIPT
    chmod 755 "$root/DEBIAN/$script"
  done
  find "$root/usr" -type d -exec chmod 755 {} +
  find "$root/usr" -type f -exec chmod 644 {} +
  dpkg-deb --build --root-owner-group -Zxz "$root" "$OUT/${pkg}_${VERSION}-1_all.deb" >/dev/null
  echo "$OUT/${pkg}_${VERSION}-1_all.deb"
done
