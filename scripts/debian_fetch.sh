# Sourced by the install_*.sh scripts: a scratch folder ($tmp, removed on exit) and `fetch PACKAGE`, which unpacks
# a Debian package's files into $tmp/root (apt-get download, after an apt-get update when root and the first try
# fails). Returns non-zero when the package cannot be had; the callers never fail the set-up.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch() {  # fetch PACKAGE: unpack a Debian package's files into $tmp/root
  (cd "$tmp" && { apt-get download "$1" >/dev/null 2>&1 \
    || { [ "$(id -u)" = 0 ] && apt-get update >/dev/null 2>&1 && apt-get download "$1" >/dev/null 2>&1; }; }) \
    && dpkg -x "$tmp"/"$1"_*.deb "$tmp/root"
}
