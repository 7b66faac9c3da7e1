#!/usr/bin/env bash
# The two screenshots of docs/img/: `kat-diag inspect` of one rollout in a terminal (tmux, 256 colours)
# and as its HTML page, both rendered by headless Chromium.
#
#   bash examples/screenshots.sh RUN STEP INDEX [OUT_DIR]
#
# e.g. `bash examples/screenshots.sh runs/fig_kat 150 12` after `make figures`. Needs tmux, aha and
# chromium on the PATH (Debian: apt-get install -y tmux aha chromium).
set -euo pipefail
RUN=$1
STEP=$2
INDEX=$3
OUT=${4:-docs/img}
KAT=${KAT_DIAG:-.venv/bin/kat-diag}
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"; tmux kill-session -t katshot 2>/dev/null || true' EXIT
CHROME=(chromium --headless --no-sandbox --disable-gpu --disable-background-networking --hide-scrollbars)

# Terminal: the coloured view in a 118 x 48 tmux pane, captured with its escape codes, converted to HTML.
tmux kill-session -t katshot 2>/dev/null || true
tmux new-session -d -s katshot -x 118 -y 48 \
  "$KAT inspect $RUN --step $STEP --index $INDEX --color --color-depth 256 --width 64; sleep 30"
for _ in $(seq 60); do  # until the view is on screen (start-up can take seconds on a busy machine)
  tmux capture-pane -t katshot -e -p > "$TMP/term.ansi"
  grep -q "^tokens:" "$TMP/term.ansi" && break
  sleep 1
done
sleep 1
tmux capture-pane -t katshot -e -p > "$TMP/term.ansi"
aha --black --title "kat-diag inspect" < "$TMP/term.ansi" \
  | sed 's/<pre>/<pre style="font-family: DejaVu Sans Mono, monospace; font-size: 14px; line-height: 1.2">/' \
  > "$TMP/term.html"
"${CHROME[@]}" --window-size=1030,560 --screenshot="$OUT/inspect_terminal.png" "file://$TMP/term.html"

# HTML: the standalone page written by --html.
$KAT inspect "$RUN" --step "$STEP" --index "$INDEX" --html "$TMP/rollout.html"
"${CHROME[@]}" --window-size=1100,1150 --screenshot="$OUT/inspect_html.png" "file://$TMP/rollout.html"
ls -l "$OUT/inspect_terminal.png" "$OUT/inspect_html.png"
