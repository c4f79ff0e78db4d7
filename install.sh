#!/bin/sh
# claude-peers installer. What it does and its options: see usage() below, or run it with --help.
# Everything is in functions and the last line calls main: piped into sh, nothing but the
# assignments below runs before the whole script has arrived.
set -eu

usage() {
    cat <<'USAGE'
claude-peers installer. Idempotent: run it again to upgrade (new files, services restarted
only when something changed; config and data are never overwritten).

  From a checkout:  ./install.sh [options]
  Piped:            curl -fsSL https://raw.githubusercontent.com/claude-peers/claude-peers/main/install.sh | sh -s -- [options]

Without --role it installs the launcher (~/.local/bin/claude-peers), the venv, a config and
a fleet token, registers the MCP server and the file-claims hook with Claude Code, and
starts nothing. A re-run keeps
and upgrades the services an earlier --role installed.

  --role hub          run the hub as a service: `claude-peers up` (broker, embedded NATS,
                      supervisor) in the systemd user unit claude-peers-hub.service, or a
                      launchd agent on macOS
  --role client       a machine whose sessions, CLI and supervisor use the hub's broker;
                      needs --broker-url and --token
  --with-supervisor   with --role client: also run `claude-peers supervise` as a service
                      (claude-peers-supervisor.service) for daemons on this machine
  --system            with --role, as root on Linux: system units in /etc/systemd/system
                      (User= this user) instead of user units
  --broker-url URL    where this machine finds the broker; writes a client config
                      ([broker] url = URL, [nats] embedded = false)
  --token TOKEN       this machine's own credential, made on the hub with
                      claude-peers token create NAME --machine NAME (the hub's admin token
                      stays on the hub)
  --source URL        where to fetch the files when piped (default: $CLAUDE_PEERS_SOURCE or GitHub)
  --uninstall         stop and remove the services, the launcher, the venv, the app files and
                      the Claude Code registration (MCP server, file-claims hook); keeps
                      the config and the data (token, databases, run transcripts); refuses
                      while a claude-peers started by hand (not a service) still runs on
                      the data dir, naming its pid
  --purge             with --uninstall: remove the config and the data too
  -h, --help          this help

Environment: CLAUDE_PEERS_HOME (data dir, default ~/.local/share/claude-peers),
CLAUDE_PEERS_BIN (launcher dir, default ~/.local/bin), XDG_CONFIG_HOME (the config is
$XDG_CONFIG_HOME/claude-peers/daemons.toml, default ~/.config), PYTHON (interpreter,
default python3), CLAUDE_PEERS_OS (for tests only: stands in for `uname -s`, e.g. Darwin
writes the launchd agent on Linux).
USAGE
}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# -- where things go --------------------------------------------------------------------

SOURCE=${CLAUDE_PEERS_SOURCE:-https://raw.githubusercontent.com/claude-peers/claude-peers/main}
DATA=${CLAUDE_PEERS_HOME:-$HOME/.local/share/claude-peers}
BIN=${CLAUDE_PEERS_BIN:-$HOME/.local/bin}
CONFIG_DIR=${XDG_CONFIG_HOME:-$HOME/.config}/claude-peers
CONFIG=$CONFIG_DIR/daemons.toml
USER_UNIT_DIR=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
SYSTEM_UNIT_DIR=/etc/systemd/system
AGENT_DIR=$HOME/Library/LaunchAgents
PYTHON=${PYTHON:-python3}
OS=${CLAUDE_PEERS_OS:-$(uname -s)}
FILES="claude_peers.py requirements.txt daemons.toml"
VPY=$DATA/venv/bin/python
ME=${USER:-$(id -un)}

ROLE=""
WITH_SUPERVISOR=""
SYSTEM=""
UNINSTALL=""
PURGE=""
BROKER_URL=""
TOKEN=""

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --role) [ $# -ge 2 ] || die "--role needs a value (hub or client)"; ROLE=$2; shift 2 ;;
            --with-supervisor) WITH_SUPERVISOR=1; shift ;;
            --system) SYSTEM=1; shift ;;
            --broker-url) [ $# -ge 2 ] || die "--broker-url needs a value"; BROKER_URL=$2; shift 2 ;;
            --token) [ $# -ge 2 ] || die "--token needs a value"; TOKEN=$2; shift 2 ;;
            --source) [ $# -ge 2 ] || die "--source needs a value"; SOURCE=$2; shift 2 ;;
            --uninstall) UNINSTALL=1; shift ;;
            --purge) PURGE=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option $1 (see --help)" ;;
        esac
    done
    case "$ROLE" in
        ""|hub|client) ;;
        *) die "--role is hub or client (got $ROLE)" ;;
    esac
    if [ -n "$UNINSTALL" ]; then
        [ -z "$ROLE$WITH_SUPERVISOR$BROKER_URL$TOKEN" ] || die "--uninstall takes no other option than --purge and --system"
    else
        [ -z "$PURGE" ] || die "--purge goes with --uninstall"
    fi
    [ "$ROLE" != client ] || { [ -n "$BROKER_URL" ] && [ -n "$TOKEN" ]; } \
        || die "--role client needs --broker-url URL and --token CREDENTIAL (make it on the hub: claude-peers token create NAME --machine NAME)"
    [ "$ROLE" != hub ] || [ -z "$BROKER_URL" ] \
        || die "--broker-url is for clients: the hub's broker listens at its [broker] listen address"
    [ -z "$WITH_SUPERVISOR" ] || [ "$ROLE" = client ] \
        || die "--with-supervisor goes with --role client (the hub's service runs a supervisor already)"
    if [ -n "$SYSTEM" ]; then
        [ "$OS" != Darwin ] || die "--system is for Linux (systemd); macOS gets a launchd agent"
        [ -n "$ROLE$UNINSTALL" ] || die "--system goes with --role hub or --role client --with-supervisor"
        [ "$(id -u)" = 0 ] || die "--system writes to $SYSTEM_UNIT_DIR: run it as root"
    fi
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
    for path in "$DATA" "$BIN" "$CONFIG_DIR" "$HOME"; do  # written into the launcher, units and plists
        case "$path" in
            *[\"\'\\\`\$%\&\<\>[:cntrl:]]*) die "$path: paths with quotes, backslashes, \$, %, &, <, > or control characters are not supported" ;;
        esac
    done
}

# -- services: systemd units (Linux) or launchd agents (macOS) ------------------------------

# hub runs `up`; supervisor runs `supervise`
service_command() { if [ "$1" = hub ]; then echo up; else echo supervise; fi; }
service_file() {
    if [ "$OS" = Darwin ]; then echo "$AGENT_DIR/io.github.claude-peers.$1.plist"
    elif [ -n "$SYSTEM" ]; then echo "$SYSTEM_UNIT_DIR/claude-peers-$1.service"
    else echo "$USER_UNIT_DIR/claude-peers-$1.service"; fi
}
sctl() { if [ -n "$SYSTEM" ]; then systemctl "$@"; else systemctl --user "$@"; fi; }
sctl_shown() { if [ -n "$SYSTEM" ]; then echo systemctl; else echo "systemctl --user"; fi; }
systemd_works() { command -v systemctl >/dev/null 2>&1 && sctl show-environment >/dev/null 2>&1; }

# The PATH services run with: the launcher's dir, the dir of `claude` if it is elsewhere, the system's.
service_path() {
    path=$BIN
    claude=$(command -v claude 2>/dev/null || true)
    case "$claude" in /*) [ "${claude%/*}" = "$BIN" ] || path="$path:${claude%/*}" ;; esac
    if [ "$OS" = Darwin ]; then echo "$path:/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin"
    else echo "$path:/usr/local/bin:/usr/bin:/bin"; fi
}

write_unit() {  # $1: hub|supervisor
    if [ "$1" = hub ]; then what="broker, embedded NATS and supervisor"; else what="daemons of daemons.toml"; fi
    cat <<UNIT
[Unit]
Description=claude-peers $1: $what (claude-peers $(service_command "$1"))
Documentation=https://github.com/claude-peers/claude-peers

[Service]
Type=simple
Environment="CLAUDE_PEERS_HOME=$DATA"
Environment="PATH=$(service_path)"
ExecStart="$BIN/claude-peers" --config "$CONFIG" $(service_command "$1")
# systemctl reload: SIGHUP, and the reload fails when daemons.toml is refused (the last good one keeps running)
ExecReload="$BIN/claude-peers" reload
UNIT
    [ -z "$SYSTEM" ] || echo "User=$ME"
    cat <<UNIT
# SIGTERM to claude-peers only: it stops its children itself, in order
KillMode=mixed
Restart=on-failure
RestartSec=5
StandardOutput=journal
StandardError=journal
SyslogIdentifier=claude-peers-$1

[Install]
WantedBy=$(if [ -n "$SYSTEM" ]; then echo multi-user.target; else echo default.target; fi)
UNIT
}

write_plist() {  # $1: hub|supervisor
    cat <<PLIST
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>io.github.claude-peers.$1</string>
    <key>ProgramArguments</key>
    <array>
        <string>$BIN/claude-peers</string>
        <string>--config</string>
        <string>$CONFIG</string>
        <string>$(service_command "$1")</string>
    </array>
    <key>EnvironmentVariables</key>
    <dict>
        <key>CLAUDE_PEERS_HOME</key>
        <string>$DATA</string>
        <key>PATH</key>
        <string>$(service_path)</string>
    </dict>
    <key>RunAtLoad</key>
    <true/>
    <key>KeepAlive</key>
    <dict>
        <key>SuccessfulExit</key>
        <false/>
    </dict>
    <key>ThrottleInterval</key>
    <integer>5</integer>
    <key>StandardOutPath</key>
    <string>$DATA/logs/$1.log</string>
    <key>StandardErrorPath</key>
    <string>$DATA/logs/$1.log</string>
</dict>
</plist>
PLIST
}

# Write the service file; start it if it is new or not enabled, restart it if it or the app changed.
install_service() {  # $1: hub|supervisor, $2: non-empty when the app changed
    file=$(service_file "$1")
    mkdir -p "${file%/*}"
    if [ "$OS" = Darwin ]; then
        mkdir -p "$DATA/logs"
        write_plist "$1" > "$file.new"
    else
        write_unit "$1" > "$file.new"
    fi
    changed=""
    if [ -f "$file" ] && cmp -s "$file.new" "$file"; then rm -f "$file.new"; else mv "$file.new" "$file"; changed=1; fi
    if [ "$OS" = Darwin ]; then
        label=io.github.claude-peers.$1
        target=gui/$(id -u)
        if ! command -v launchctl >/dev/null 2>&1; then
            say "wrote $file; launchctl not found: load it with: launchctl bootstrap $target $file"
        elif [ -n "$changed" ] || ! launchctl print "$target/$label" >/dev/null 2>&1; then
            launchctl bootout "$target/$label" >/dev/null 2>&1 || true
            launchctl bootstrap "$target" "$file" || die "launchctl could not load $file"
            say "loaded the launchd agent $label ($file; log: $DATA/logs/$1.log)"
        elif [ -n "$2" ]; then
            launchctl kickstart -k "$target/$label" || die "launchctl could not restart $label"
            say "restarted $label (new version)"
        else
            say "$label unchanged, left running"
        fi
        return
    fi
    unit=claude-peers-$1.service
    if ! systemd_works; then
        say "wrote $file; $(sctl_shown) does not work here (no systemd, or no user session bus): once it does, run:"
        say "    $(sctl_shown) daemon-reload && $(sctl_shown) enable --now $unit"
        return
    fi
    if [ -n "$changed" ]; then sctl daemon-reload || die "$(sctl_shown) daemon-reload failed"; fi
    if ! sctl is-enabled "$unit" >/dev/null 2>&1; then
        sctl enable --now "$unit" 2>/dev/null || die "$(sctl_shown) enable --now $unit failed (see: $(sctl_shown) status $unit)"
        say "enabled and started $unit ($file)"
    elif [ -n "$changed$2" ]; then
        sctl restart "$unit" || die "$(sctl_shown) restart $unit failed (see: $(sctl_shown) status $unit)"
        say "restarted $unit (new version)"
    else
        say "$unit unchanged, left running"
    fi
    say "    logs: journalctl $([ -n "$SYSTEM" ] || echo '--user ')-u $unit -f"
}

# Stop, disable and delete one service file; prints nothing when it is not there.
remove_service() {  # $1: hub|supervisor
    file=$(service_file "$1")
    [ -f "$file" ] || return 0
    how="not stopped: no service manager here"
    if [ "$OS" = Darwin ]; then
        if command -v launchctl >/dev/null 2>&1; then
            launchctl bootout "gui/$(id -u)/io.github.claude-peers.$1" >/dev/null 2>&1 || true
            how="unloaded"
        fi
    elif systemd_works; then
        sctl disable --now "claude-peers-$1.service" >/dev/null 2>&1 || true
        how="stopped and disabled"
    fi
    rm -f "$file"
    say "removed $file ($how)"
    [ "$OS" = Darwin ] || ! systemd_works || sctl daemon-reload || true
}

linger_note() {
    [ "$OS" != Darwin ] && [ -z "$SYSTEM" ] || return 0
    linger=$(loginctl show-user "$ME" --property=Linger 2>/dev/null || true)
    [ "$linger" = Linger=yes ] \
        || say "note: to keep user services running without a login session (and start them at boot), run: loginctl enable-linger $ME"
}

# -- installing -----------------------------------------------------------------------------

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11 or newer (or set PYTHON=/path/to/python3.11)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "claude-peers needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown) (set PYTHON=/path/to/python3.11)"
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
        || die "$PYTHON cannot create virtual environments: install the venv module (Debian/Ubuntu: apt install python3-venv)"
}

# What the services run: a change here restarts them.
fingerprint() {
    {
        for f in $FILES; do cat "$DATA/app/$f" 2>/dev/null || true; done
        cat "$BIN/claude-peers" 2>/dev/null || true
        ls "$DATA"/venv/lib/python*/site-packages 2>/dev/null || true  # the installed versions
    } | cksum
}

fetch_files() {
    mkdir -p "$DATA/app"
    chmod 700 "$DATA"
    here=""
    case "$0" in  # piped into sh, $0 is the shell: there is no checkout
        *install.sh) here=$(cd "$(dirname "$0")" 2>/dev/null && pwd || true) ;;
    esac
    if [ -n "$here" ] && [ -f "$here/claude_peers.py" ] && [ -f "$here/requirements.txt" ]; then
        for f in $FILES; do cp "$here/$f" "$DATA/app/$f.new" && mv "$DATA/app/$f.new" "$DATA/app/$f"; done
        say "installing from checkout $here"
    else
        command -v curl >/dev/null 2>&1 || die "curl not found: install curl, or run install.sh from a checkout"
        for f in $FILES; do
            curl -fsSL "$SOURCE/$f" -o "$DATA/app/$f.new" \
                || die "could not download $SOURCE/$f (no network? set --source or CLAUDE_PEERS_SOURCE)"
            mv "$DATA/app/$f.new" "$DATA/app/$f"
        done
        say "installing from $SOURCE"
    fi
}

# The venv with the pinned packages; pip's output goes to a log, a dot per package to the screen.
install_packages() {
    if [ ! -x "$VPY" ]; then
        say "creating the virtual environment $DATA/venv"
        "$PYTHON" -m venv "$DATA/venv" || die "could not create the venv in $DATA/venv"
    fi
    printf 'install.sh: installing the pinned Python packages into %s (pip) ' "$DATA/venv"
    { "$VPY" -m pip install --disable-pip-version-check --no-input --progress-bar off \
          -r "$DATA/app/requirements.txt" 2>&1; echo $? > "$WORK/pip.rc"; } \
        | PIP_LOG=$WORK/pip.log awk '
            { print > (ENVIRON["PIP_LOG"]) }
            /^(Collecting|Requirement already satisfied)/ { printf "."; n++; fflush() }
            END { printf " %d packages", n }'
    if [ "$(cat "$WORK/pip.rc")" != 0 ]; then
        printf ', failed:\n'
        tail -n 15 "$WORK/pip.log" | sed 's/^/    /' >&2
        die "pip could not install the pinned packages from $DATA/app/requirements.txt (no network? a proxy? see pip's message above)"
    fi
    printf ', done\n'
}

# The launcher runs the module imported from $DATA/app (a claude_peers.pth in the venv points
# there), so Python uses its cached bytecode instead of compiling it at every start.
install_launcher() {
    site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || die "cannot find the venv's site-packages"
    printf '%s\n' "$DATA/app" > "$site/claude_peers.pth"
    "$VPY" -m compileall -q "$DATA/app" >/dev/null || die "could not byte-compile $DATA/app"
    mkdir -p "$BIN"
    cat > "$BIN/claude-peers.new" <<LAUNCHER
#!/bin/sh
# claude-peers, installed by install.sh: the module from $DATA/app, imported (-P: not from the current directory)
export CLAUDE_PEERS_HOME="\${CLAUDE_PEERS_HOME:-$DATA}"
exec "$VPY" -P -m claude_peers "\$@"
LAUNCHER
    chmod 755 "$BIN/claude-peers.new"
    mv "$BIN/claude-peers.new" "$BIN/claude-peers"
}

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

# Config and token: written when missing, never overwritten (--token replaces the token).
install_config() {
    mkdir -p "$CONFIG_DIR"
    if [ ! -f "$CONFIG" ]; then
        if [ -n "$BROKER_URL" ]; then
            client_config "$DATA/app/daemons.toml" > "$CONFIG.new" || die "could not set [broker] url in $CONFIG.new"
            mv "$CONFIG.new" "$CONFIG"
            say "wrote $CONFIG (a client: [broker] url = \"$BROKER_URL\", [nats] embedded = false)"
        else
            cp "$DATA/app/daemons.toml" "$CONFIG"
            say "wrote $CONFIG"
        fi
    elif [ -n "$BROKER_URL" ]; then
        say "kept your $CONFIG: for this client set [broker] url = \"$BROKER_URL\" and [nats] embedded = false there"
    else
        say "kept your $CONFIG"
    fi
    if [ -n "$TOKEN" ]; then
        if [ -f "$DATA/token" ] && [ "$(cat "$DATA/token")" = "$TOKEN" ]; then
            say "the fleet token in $DATA/token is already that one"
        else
            (umask 077 && printf '%s\n' "$TOKEN" > "$DATA/token.new") && chmod 600 "$DATA/token.new"
            mv "$DATA/token.new" "$DATA/token"
            say "wrote the fleet token to $DATA/token"
        fi
    elif [ -f "$DATA/token" ]; then
        :
    elif [ -n "$BROKER_URL" ]; then
        say "note: no credential for this machine yet: make one on the hub (claude-peers token create $(uname -n) --machine $(uname -n)) and run install.sh again with --token CREDENTIAL"
    else
        # its log line would repeat ours: shown only when it fails
        err=$("$BIN/claude-peers" --config "$CONFIG" token --create 2>&1 >/dev/null) \
            || die "could not create the fleet token: $err"
        say "created the hub's admin token in $DATA/token: it stays on this machine; each other machine gets its own credential (claude-peers token create NAME --machine NAME)"
    fi
}

# alwaysLoad keeps the tools in the model's view: Claude Code's tool search defers MCP tools
# otherwise. `claude mcp add` cannot set it, `claude mcp add-json` can.
register_mcp() {
    entry=$("$VPY" -c 'import json, sys; print(json.dumps({"type": "stdio", "command": sys.argv[1], "args": ["shim"], "alwaysLoad": True}))' "$BIN/claude-peers")
    if ! command -v claude >/dev/null 2>&1; then
        say "note: claude not found; once Claude Code is installed run: claude mcp add-json --scope user claude-peers '$entry'"
    elif claude mcp get claude-peers >/dev/null 2>&1 </dev/null; then
        say "claude-peers is already registered with Claude Code (doctor below says if it lacks alwaysLoad)"
    elif claude mcp add-json --scope user claude-peers "$entry" >/dev/null 2>&1 </dev/null; then
        say "registered the MCP server with Claude Code (user scope, alwaysLoad)"
    else
        say "note: could not register with Claude Code; run: claude mcp add-json --scope user claude-peers '$entry'"
    fi
}

# The PreToolUse hook that enforces file claims, merged into Claude Code's user settings
# (~/.claude/settings.json: other hooks and settings stay as they are).
register_hook() {
    if ! command -v claude >/dev/null 2>&1; then
        say "note: claude not found; once Claude Code is installed run: claude-peers hook install"
    elif said=$("$BIN/claude-peers" hook install --launcher "$BIN/claude-peers" 2>&1 </dev/null); then
        say "$said"
    else
        say "note: could not register the file-claims hook: $said"
    fi
}

# The config must load: doctor's first line says so. Its other FAIL lines (a hub not started
# yet, no claude) are what is left to do, shown but not fatal.
check_doctor() {
    doctor=$("$BIN/claude-peers" --config "$CONFIG" doctor 2>&1 </dev/null) || true
    case "$doctor" in
        "ok    config "*)
            say "claude-peers doctor (a FAIL is a step still to take, e.g. starting the hub, not an install error):"
            printf '%s\n' "$doctor" | sed 's/^/    /' ;;
        *) die "the installed claude-peers does not load its config: $(printf '%s\n' "$doctor" | head -n 1)" ;;
    esac
}

install_all() {
    check_python
    before=$(fingerprint)
    fetch_files
    install_packages
    install_launcher
    install_config
    register_mcp
    register_hook
    check_doctor
    app_changed=""
    [ "$(fingerprint)" = "$before" ] || app_changed=1

    # the services: those of --role, else the ones an earlier install set up
    wanted=""
    case "$ROLE" in
        hub) wanted=hub ;;
        client) [ -z "$WITH_SUPERVISOR" ] || wanted=supervisor ;;
        "") for svc in hub supervisor; do [ ! -f "$(service_file "$svc")" ] || wanted="$wanted $svc"; done ;;
    esac
    if [ -n "$ROLE" ]; then
        for svc in hub supervisor; do
            case " $wanted " in *" $svc "*) ;; *) remove_service "$svc" ;; esac
        done
    fi
    if [ -n "$wanted" ] && [ "$OS" != Darwin ] && ! command -v systemctl >/dev/null 2>&1; then
        say "note: no systemd here: run the service yourself under your init system:"
        for svc in $wanted; do say "    $BIN/claude-peers --config $CONFIG $(service_command "$svc")"; done
        wanted=""
    fi
    for svc in $wanted; do install_service "$svc" "$app_changed"; done
    [ -z "$wanted" ] || linger_note

    say "installed: $BIN/claude-peers ($("$BIN/claude-peers" --version))"
    case ":$PATH:" in
        *":$BIN:"*) ;;
        *) say "note: $BIN is not on your PATH; add it, e.g. echo 'export PATH=\"$BIN:\$PATH\"' >> ~/.profile" ;;
    esac
    if [ "$ROLE" = hub ]; then
        say "next: for other machines set [broker] listen in $CONFIG to this machine's mesh address and restart the hub; then for each machine NAME make its own credential here:"
        say "    claude-peers token create NAME --machine NAME"
        say "  and on that machine install with it (the admin token never leaves this hub):"
        say "    install.sh --role client --broker-url http://<that address>:7899 --token <the credential it printed>"
    elif [ -z "$ROLE$BROKER_URL$wanted" ]; then
        say "next: run the hub in the foreground with: claude-peers up (or as a service: install.sh --role hub)"
    fi
}

# -- uninstalling ---------------------------------------------------------------------------

# With the services stopped, a claude-peers still running on $DATA (an `up` started by hand) would
# lose its venv under it: refuse, naming it, before anything else is removed.
refuse_while_running() {
    [ -x "$BIN/claude-peers" ] || return 0
    running=$("$BIN/claude-peers" running 2>/dev/null) || return 0
    pids=$(printf '%s\n' "$running" | sed -n 's/^[a-z]* (pid \([0-9]*\)).*/\1/p' | tr '\n' ' ')
    what=$(printf '%s' "$running" | tr '\n' ';' | sed 's/;/; /g')
    die "claude-peers still runs on $DATA: $what. Stop it (Ctrl-C where it runs, or kill ${pids% }), then run install.sh --uninstall again"
}

uninstall_all() {
    SYSTEM=""
    for svc in hub supervisor; do remove_service "$svc"; done
    if [ "$OS" != Darwin ]; then  # and the system units of an install with --system
        SYSTEM=1
        for svc in hub supervisor; do
            [ -f "$(service_file "$svc")" ] || continue
            [ "$(id -u)" = 0 ] || die "$(service_file "$svc") is a system unit: run install.sh --uninstall as root"
            remove_service "$svc"
        done
        SYSTEM=""
    fi
    refuse_while_running
    if command -v claude >/dev/null 2>&1 \
            && claude mcp remove --scope user claude-peers >/dev/null 2>&1 </dev/null; then
        say "removed the MCP server claude-peers from Claude Code (user scope)"
    fi
    if [ -x "$BIN/claude-peers" ] && said=$("$BIN/claude-peers" hook uninstall 2>&1 </dev/null); then
        case "$said" in removed*) say "$said" ;; esac
    fi
    for path in "$BIN/claude-peers" "$DATA/venv" "$DATA/app"; do
        [ -e "$path" ] || continue
        rm -rf "$path"
        say "removed $path"
    done
    if [ -n "$PURGE" ]; then
        for path in "$DATA" "$CONFIG_DIR"; do
            [ -e "$path" ] || continue
            rm -rf "$path"
            say "removed $path"
        done
    elif [ -e "$CONFIG_DIR" ] || [ -e "$DATA" ]; then
        [ ! -e "$CONFIG_DIR" ] || say "kept $CONFIG_DIR (the config)"
        [ ! -e "$DATA" ] || say "kept $DATA (the fleet token, databases, run transcripts)"
        say "remove them too with: install.sh --uninstall --purge"
    fi
    say "uninstalled claude-peers"
}

main() {
    parse_args "$@"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    trap 'exit 130' HUP INT TERM
    if [ -n "$UNINSTALL" ]; then uninstall_all; else install_all; fi
}

main "$@"
