#!/usr/bin/env bash
# PostgreSQL and pgvector >= 0.8 for tests/test_postgres.py (run as root on Debian).
# Idempotent: when the newest installed server already has the extension it only checks.
# The tests start their own throwaway server on 127.0.0.1; this script starts nothing.
#
# Debian 13 ships postgresql-NN-pgvector. Debian 12 ships none, so pgvector is built from
# Debian's own source package (Debian 13's, the first >= 0.8) against the installed server's
# headers. The deb-src entry is derived from this machine's apt configuration, in a private
# list so the machine's own sources stay as they were.
set -euo pipefail

MIN_VECTOR=0.8
export DEBIAN_FRONTEND=noninteractive

major() { ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1; }

vector_ok() {
    local control="/usr/share/postgresql/$1/extension/vector.control" version
    [ -f "$control" ] || return 1
    version=$(sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" "$control")
    [ "$(printf '%s\n%s\n' "$MIN_VECTOR" "$version" | sort -V | head -n 1)" = "$MIN_VECTOR" ]
}

updated=no
apt_update() { [ "$updated" = yes ] || { apt-get update -q >/dev/null; updated=yes; }; }

if [ -z "$(major)" ] || [ ! -x "/usr/lib/postgresql/$(major)/bin/postgres" ]; then
    apt_update
    apt-get install -y -q --no-install-recommends postgresql >/dev/null
fi
PG=$(major)
if vector_ok "$PG"; then
    echo "postgres.sh: PostgreSQL $PG with pgvector $MIN_VECTOR+ already installed"
    exit 0
fi

apt_update
candidate=$(apt-cache policy "postgresql-$PG-pgvector" 2>/dev/null | sed -n 's/^ *Candidate: *//p')
if [ -n "$candidate" ] && [ "$candidate" != "(none)" ]; then
    apt-get install -y -q --no-install-recommends "postgresql-$PG-pgvector" >/dev/null
fi

if ! vector_ok "$PG"; then
    # Build Debian's pgvector source package. Sources: every deb entry of this release's
    # main suite, as deb-src, for this release and Debian 13 (trixie), whichever is newer.
    . /etc/os-release
    codename=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial"
    : >"$work/src.list"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v c="$codename" '$1 == "deb" {
            i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            if ($(i + 1) != c) next
            line = $0; sub(/^deb/, "deb-src", line); print line
            sub(" " c " ", " trixie ", line); print line }' "$f" >>"$work/src.list"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v c="$codename" 'BEGIN { RS = ""; ORS = "\n\n" } {
            n = split($0, lines, "\n"); deb = 0; main = 0
            for (j = 1; j <= n; j++) {
                if (lines[j] ~ /^Types:/ && lines[j] ~ /[ \t]deb([ \t]|$)/) deb = 1
                if (lines[j] ~ /^Suites:/ && (" " lines[j] " ") ~ (" " c " ")) main = 1
            }
            if (!deb || !main) next
            out = ""
            for (j = 1; j <= n; j++) {
                if (lines[j] ~ /^Types:/) lines[j] = "Types: deb-src"
                else if (lines[j] ~ /^Suites:/) lines[j] = "Suites: " c " trixie"
                out = out lines[j] "\n"
            }
            printf "%s\n", out }' "$f" >"$work/src-$(basename "$f")"
    done
    [ -s "$work/src.list" ] || rm -f "$work/src.list"
    ls "$work"/src* >/dev/null 2>&1 || { echo "postgres.sh: no deb entry for $codename" >&2; exit 1; }
    mkdir -p "$work/parts"
    for f in "$work"/src-*; do [ -f "$f" ] && mv "$f" "$work/parts/$(basename "$f" | cut -c5-)"; done
    [ -f "$work/src.list" ] && mv "$work/src.list" "$work/parts/src.list"
    apt_src=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/parts"
        -o "Dir::State::Lists=$work/lists")
    apt-get "${apt_src[@]}" update -q >/dev/null
    apt-get install -y -q --no-install-recommends build-essential dpkg-dev \
        "postgresql-server-dev-$PG" >/dev/null
    (cd "$work" && apt-get "${apt_src[@]}" source -q pgvector >/dev/null)
    src=$(find "$work" -maxdepth 1 -type d -name 'pgvector-*' | sort -V | tail -n 1)
    [ -n "$src" ] || { echo "postgres.sh: apt-get source pgvector fetched nothing" >&2; exit 1; }
    # OPTFLAGS="": no -march=native, so the build runs on any CPU of the architecture
    make -C "$src" -s -j"$(nproc)" OPTFLAGS="" with_llvm=no \
        PG_CONFIG="/usr/lib/postgresql/$PG/bin/pg_config" >/dev/null
    make -C "$src" -s OPTFLAGS="" with_llvm=no \
        PG_CONFIG="/usr/lib/postgresql/$PG/bin/pg_config" install >/dev/null
fi

vector_ok "$PG" || { echo "postgres.sh: pgvector $MIN_VECTOR+ still missing for PostgreSQL $PG" >&2; exit 1; }
echo "postgres.sh: PostgreSQL $PG with pgvector $(sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" \
    "/usr/share/postgresql/$PG/extension/vector.control")"
