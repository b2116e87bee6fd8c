#!/usr/bin/env bash
# Puts WordNet 3.0 where nltk looks for it (<venv>/nltk_data/corpora/wordnet), from Debian's wordnet-base
# package, so METEOR can match synonyms. Without it METEOR falls back to exact + stem matching (and records
# that it did). Never fails the set-up: a machine without apt simply gets the fallback.
set -u
dest="${1:?usage: install_wordnet.sh VENV}/nltk_data/corpora/wordnet"
[ -f "$dest/data.noun" ] && exit 0
src=/usr/share/wordnet
if [ ! -f "$src/data.noun" ]; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download wordnet-base >/dev/null 2>&1 \
      || { [ "$(id -u)" = 0 ] && apt-get update >/dev/null 2>&1 && apt-get download wordnet-base >/dev/null 2>&1; }); then
    dpkg -x "$tmp"/wordnet-base_*.deb "$tmp/root" && src="$tmp/root/usr/share/wordnet"
  fi
fi
if [ -f "$src/data.noun" ]; then
  mkdir -p "$dest" && cp -rL "$src"/. "$dest"/ && echo "WordNet installed under $dest"
else
  echo "WordNet not available (no apt?): METEOR will use exact + stem matching only" >&2
fi
exit 0
