#!/usr/bin/env bash
# Puts WordNet 3.0 where nltk looks for it (<venv>/nltk_data/corpora/wordnet), from Debian's wordnet-base and
# wordnet-sense-index packages, so METEOR can match synonyms. nltk also needs `lexnames` (the 45 lexicographer
# file names, fixed since WordNet 2.0), which Debian ships only as a man page: it is written here. Without
# WordNet, METEOR falls back to exact + stem matching (and records that it did). Never fails the set-up.
set -u
dest="${1:?usage: install_wordnet.sh VENV}/nltk_data/corpora/wordnet"
[ -f "$dest/data.noun" ] && [ -f "$dest/index.sense" ] && [ -f "$dest/lexnames" ] && exit 0
. "$(dirname "$0")/debian_fetch.sh"
if fetch wordnet-base && fetch wordnet-sense-index && [ -f "$tmp/root/usr/share/wordnet/data.noun" ]; then
  mkdir -p "$dest" && cp -rL "$tmp/root/usr/share/wordnet"/. "$dest"/
  i=0
  for name in adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body \
      noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive \
      noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity \
      noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition \
      verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion \
      verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl; do
    case "$name" in adj.*) cat=3;; adv.*) cat=4;; noun.*) cat=1;; verb.*) cat=2;; esac
    printf '%02d\t%s\t%s\n' "$i" "$name" "$cat"
    i=$((i + 1))
  done > "$dest/lexnames"
  echo "WordNet installed under $dest"
else
  echo "WordNet not available (no apt?): METEOR will use exact + stem matching only" >&2
fi
exit 0
