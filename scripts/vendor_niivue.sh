#!/usr/bin/env bash
# Refresh the NiiVue viewer shipped inside volseg (volseg/review/static/niivue.umd.js) from npm.
# The file is the unchanged UMD build of @niivue/niivue (BSD-2, see NIIVUE_LICENSE.txt beside it);
# volseg review serves it itself, so the viewer needs no network at run time.
#   scripts/vendor_niivue.sh [VERSION]    # default: the version volseg is tested with
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-0.69.0}"
SHA256_0_69_0=47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@niivue/niivue@$VERSION" >/dev/null && tar xzf niivue-niivue-*.tgz)
src="$tmp/package/dist/niivue.umd.js"
if [ "$VERSION" = 0.69.0 ]; then
    echo "$SHA256_0_69_0  $src" | sha256sum -c --quiet
fi
cp "$src" volseg/review/static/niivue.umd.js
sed -i "1s/@niivue\/niivue [0-9.]*/@niivue\/niivue $VERSION/" volseg/review/static/NIIVUE_LICENSE.txt
echo "volseg/review/static/niivue.umd.js <- @niivue/niivue $VERSION ($(sha256sum volseg/review/static/niivue.umd.js | cut -c1-16)...)"
