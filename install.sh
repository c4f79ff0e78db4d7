#!/bin/sh
# claude-peers installer. Idempotent: run it again to upgrade or repair.
#
#   From a checkout:  ./install.sh [options]
#   Piped:            curl -fsSL https://raw.githubusercontent.com/claude-peers/claude-peers/main/install.sh | sh -s -- [options]
#
# Options:
#   --broker-url URL   where this machine finds the broker (client machines)
#   --token TOKEN      the fleet token (copy it from the hub: claude-peers token)
#   --source URL       where to fetch the files when piped (default: $CLAUDE_PEERS_SOURCE or GitHub)
#   -h, --help         this help
#
# Environment: CLAUDE_PEERS_HOME (data dir, default ~/.local/share/claude-peers),
# CLAUDE_PEERS_BIN (launcher dir, default ~/.local/bin), PYTHON (interpreter, default python3).
set -eu

SOURCE=${CLAUDE_PEERS_SOURCE:-https://raw.githubusercontent.com/claude-peers/claude-peers/main}
DATA=${CLAUDE_PEERS_HOME:-$HOME/.local/share/claude-peers}
BIN=${CLAUDE_PEERS_BIN:-$HOME/.local/bin}
CONFIG_DIR=${XDG_CONFIG_HOME:-$HOME/.config}/claude-peers
PYTHON=${PYTHON:-python3}
BROKER_URL=""
TOKEN=""
FILES="claude_peers.py requirements.txt daemons.toml"

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# The template with [broker] url set and [nats] embedded = false, each edited inside its own table only.
client_config() {
    CP_BROKER_URL=$BROKER_URL awk '
        /^[ \t]*\[/ { table = $0; sub(/^[ \t]*\[+[ \t]*/, "", table); sub(/[ \t]*\].*/, "", table) }
        table == "broker" && /^[ \t]*url[ \t]*=/ { print "url = \"" ENVIRON["CP_BROKER_URL"] "\""; url++; next }
        table == "nats" && /^[ \t]*embedded[ \t]*=/ { print "embedded = false"; embedded++; next }
        { print }
        END { exit !(url == 1 && embedded == 1) }
    ' "$1"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --broker-url) [ $# -ge 2 ] || die "--broker-url needs a value"; BROKER_URL=$2; shift 2 ;;
        --token) [ $# -ge 2 ] || die "--token needs a value"; TOKEN=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a value"; SOURCE=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" 2>/dev/null | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case "$BROKER_URL" in
    ""|http://?*|https://?*) ;;
    *) die "--broker-url must start with http:// or https:// (got $BROKER_URL)" ;;
esac
case "$BROKER_URL" in  # it goes into daemons.toml as a quoted string
    *[\"\'\\\`[:space:][:cntrl:]]*) die "--broker-url must not contain quotes, backslashes, spaces or control characters" ;;
esac
case "$TOKEN" in
    *[[:space:][:cntrl:]]*) die "--token must not contain spaces or control characters" ;;
esac

# -- Python 3.11+ with venv ---------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11 or newer (or set PYTHON=/path/to/python3.11)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "claude-peers needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown) (set PYTHON=/path/to/python3.11)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON cannot create virtual environments: install the venv module (Debian/Ubuntu: apt install python3-venv)"

# -- the files: from this checkout, or downloaded ------------------------------
mkdir -p "$DATA/app"
chmod 700 "$DATA"
HERE=""
case "$0" in  # piped into sh, $0 is the shell: there is no checkout
    *install.sh) HERE=$(cd "$(dirname "$0")" 2>/dev/null && pwd || true) ;;
esac
if [ -n "$HERE" ] && [ -f "$HERE/claude_peers.py" ] && [ -f "$HERE/requirements.txt" ]; then
    for f in $FILES; do cp "$HERE/$f" "$DATA/app/$f.new" && mv "$DATA/app/$f.new" "$DATA/app/$f"; done
    say "installing from checkout $HERE"
else
    command -v curl >/dev/null 2>&1 || die "curl not found: install curl, or run install.sh from a checkout"
    for f in $FILES; do
        curl -fsSL "$SOURCE/$f" -o "$DATA/app/$f.new" \
            || die "could not download $SOURCE/$f (no network? set --source or CLAUDE_PEERS_SOURCE)"
        mv "$DATA/app/$f.new" "$DATA/app/$f"
    done
    say "installing from $SOURCE"
fi

# -- the virtual environment with the pinned packages ---------------------------
if [ ! -x "$DATA/venv/bin/python" ]; then
    "$PYTHON" -m venv "$DATA/venv" || die "could not create the venv in $DATA/venv"
fi
if ! "$DATA/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$DATA/app/requirements.txt"; then
    die "pip could not install the pinned packages from $DATA/app/requirements.txt (no network? a proxy? see pip's message above)"
fi

# -- the launcher on PATH -------------------------------------------------------
mkdir -p "$BIN"
cat > "$BIN/claude-peers.new" <<EOF
#!/bin/sh
export CLAUDE_PEERS_HOME="\${CLAUDE_PEERS_HOME:-$DATA}"
exec "$DATA/venv/bin/python" "$DATA/app/claude_peers.py" "\$@"
EOF
chmod 755 "$BIN/claude-peers.new"
mv "$BIN/claude-peers.new" "$BIN/claude-peers"

# -- config and token (never overwritten) --------------------------------------
mkdir -p "$CONFIG_DIR"
if [ ! -f "$CONFIG_DIR/daemons.toml" ]; then
    if [ -n "$BROKER_URL" ]; then
        client_config "$DATA/app/daemons.toml" > "$CONFIG_DIR/daemons.toml.new" \
            || die "could not set [broker] url in $CONFIG_DIR/daemons.toml.new"
        mv "$CONFIG_DIR/daemons.toml.new" "$CONFIG_DIR/daemons.toml"
        say "wrote $CONFIG_DIR/daemons.toml (a client: [broker] url = \"$BROKER_URL\", [nats] embedded = false)"
    else
        cp "$DATA/app/daemons.toml" "$CONFIG_DIR/daemons.toml"
        say "wrote $CONFIG_DIR/daemons.toml"
    fi
elif [ -n "$BROKER_URL" ]; then
    say "kept your $CONFIG_DIR/daemons.toml: set [broker] url = \"$BROKER_URL\" there yourself"
fi
if [ -n "$TOKEN" ]; then
    umask 077
    printf '%s\n' "$TOKEN" > "$DATA/token"
    chmod 600 "$DATA/token"
    say "wrote the fleet token to $DATA/token"
elif [ -f "$DATA/token" ]; then
    :
elif [ -n "$BROKER_URL" ]; then
    say "note: no fleet token yet: copy it from the hub (claude-peers token) into $DATA/token, or run install.sh again with --token"
else
    # its log line would repeat ours: shown only when it fails
    err=$(CLAUDE_PEERS_HOME=$DATA "$BIN/claude-peers" --config "$CONFIG_DIR/daemons.toml" token --create 2>&1 >/dev/null) \
        || die "could not create the fleet token: $err"
    say "created a fleet token in $DATA/token (copy it to other machines: claude-peers token)"
fi

# -- the MCP server, registered with Claude Code when it is here ------------------
if command -v claude >/dev/null 2>&1; then
    if claude mcp get claude-peers >/dev/null 2>&1; then
        say "claude-peers is already registered with Claude Code"
    elif claude mcp add --scope user claude-peers -- "$BIN/claude-peers" shim >/dev/null 2>&1; then
        say "registered the MCP server with Claude Code (user scope)"
    else
        say "note: could not register with Claude Code; run: claude mcp add --scope user claude-peers -- $BIN/claude-peers shim"
    fi
else
    say "note: claude not found; once Claude Code is installed run: claude mcp add --scope user claude-peers -- $BIN/claude-peers shim"
fi

# -- the config must load: doctor's first line says so --------------------------------
# (its other FAIL lines, e.g. a hub not started yet or no claude, are what is left to do)
doctor=$("$BIN/claude-peers" --config "$CONFIG_DIR/daemons.toml" doctor 2>&1 </dev/null) || true
case "$doctor" in
    "ok    config "*) say "claude-peers doctor:"; printf '%s\n' "$doctor" | sed 's/^/    /' ;;
    *) die "the installed claude-peers does not load its config: $(printf '%s\n' "$doctor" | head -n 1)" ;;
esac
say "installed: $BIN/claude-peers ($("$BIN/claude-peers" --version))"
case ":$PATH:" in
    *":$BIN:"*) ;;
    *) say "note: $BIN is not on your PATH; add it, e.g. echo 'export PATH=\"$BIN:\$PATH\"' >> ~/.profile" ;;
esac
