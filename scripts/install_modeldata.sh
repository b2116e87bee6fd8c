#!/usr/bin/env bash
# Puts the datasets of the R package modeldata (MIT; small_fine_foods among them: Amazon fine-food reviews labelled
# great/other, the prompt task's `data.source: fine-foods`) under <venv>/share/modeldata, from Debian's
# r-cran-modeldata package: R's lazy-load database (Rdata.rdb + its index Rdata.rdx, read with the rdata package by
# ptg.tasks.prompt.data), the package's DESCRIPTION and Debian's copyright file (the MIT text: DESCRIPTION only names it).
# Without them the fine-foods source raises an error that names this script. Never fails the set-up.
set -u
dest="${1:?usage: install_modeldata.sh VENV}/share/modeldata"
[ -f "$dest/Rdata.rdb" ] && [ -f "$dest/Rdata.rdx" ] && [ -f "$dest/DESCRIPTION" ] && exit 0
. "$(dirname "$0")/debian_fetch.sh"
pkg="$tmp/root/usr/lib/R/site-library/modeldata"
if fetch r-cran-modeldata && [ -f "$pkg/data/Rdata.rdb" ] && [ -f "$pkg/data/Rdata.rdx" ]; then
  mkdir -p "$dest" && cp -L "$pkg/data/Rdata.rdb" "$pkg/data/Rdata.rdx" "$pkg/DESCRIPTION" "$dest"/
  cp -L "$tmp/root/usr/share/doc/r-cran-modeldata/copyright" "$dest"/ 2>/dev/null
  echo "modeldata installed under $dest"
else
  echo "modeldata not available (no apt?): data.source fine-foods will not work" >&2
fi
exit 0
