#!/usr/bin/env bash
# Download (never install) the .deb files that run espeak-ng without apt, into .carry/debs/.
#
# Run this on a machine WITH apt and internet (a Debian/Ubuntu dev box). The training machine has
# neither: there `run_espeak` (synth.py) unpacks these files with `dpkg -x` into a private folder and
# runs espeak-ng from it with LD_LIBRARY_PATH / ESPEAK_DATA_PATH set.
#
# The list is espeak-ng's full runtime closure (`apt-cache depends --recurse`, hard Depends only),
# minus the C runtime every Linux image has (libc6, libgcc-s1, gcc-*-base) and minus alternatives
# that would shadow each other (libelogind0 is the other choice for libsystemd0), plus wamerican
# (the word list /usr/share/dict/words used by the text generator).
#
# Usage: recipes/synthetic_en/fetch_debs.sh [DEST]   (default: <repo>/.carry/debs, git-ignored)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
dest=${1:-$repo/.carry/debs}
mkdir -p "$dest"
command -v apt-get >/dev/null || { echo "fetch_debs.sh: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
if ! apt-cache show espeak-ng >/dev/null 2>&1; then
  apt-get update -qq
fi
skip='^(libc6|libgcc-s1|gcc-[0-9]+-base|libelogind0)$'
pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
         --no-replaces --no-enhances espeak-ng \
       | grep -v '^ ' | grep -v '^<' | sort -u | grep -Ev "$skip")
pkgs="$pkgs wamerican"
cd "$dest"
rm -f ./*.deb
opts=()
[ "$(id -u)" = 0 ] && opts=(-o APT::Sandbox::User=root)  # root may not hand files to _apt
# shellcheck disable=SC2086
apt-get ${opts[@]+"${opts[@]}"} download $pkgs >/dev/null
ls -1 ./*.deb | sed 's|^\./||' > MANIFEST
echo "fetch_debs.sh: $(wc -l < MANIFEST) packages, $(du -sh . | cut -f1) in $dest"
