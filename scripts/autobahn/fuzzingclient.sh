#!/usr/bin/env bash
# Runs the Autobahn fuzzingclient (wstest -m fuzzingclient) against one
# WebSocket server and fails unless every case is clean.
#
# usage: fuzzingclient.sh URL AGENT OUTDIR [CASES] [EXCLUDE]
#   URL      ws://host:port/path of the server under test (must be running)
#   AGENT    agent name used in the report
#   OUTDIR   report directory (index.json, per-case reports, wstest.log,
#            spec.json, expected-cases.json, summary.txt)
#   CASES    JSON array or comma-separated list of case patterns, default ["*"]
#   EXCLUDE  JSON array or comma-separated list of patterns to exclude,
#            default []   (e.g. '12.*,13.*' or '["9.*"]')
#
# Environment:
#   AUTOBAHN_TIMEOUT=2400          wall-clock limit for wstest, seconds
#   AUTOBAHN_CONNECT_WAIT=15       seconds to wait for the server port to accept
#   AUTOBAHN_ALLOW_UNIMPLEMENTED=1 accept UNIMPLEMENTED (server without deflate)
#   AUTOBAHN_NO_INSTALL=1          do not run install.sh first (it is
#                                  idempotent and takes ~1s when installed)
#   AUTOBAHN_CACHE_DIR             see install.sh
#
# Exit status: 0 all clean; 1 failing/missing cases; 2 usage/setup error;
# 3 wstest crashed or timed out.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/autobahn/common.sh
. "$SCRIPT_DIR/common.sh"

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 3 ] && [ $# -le 5 ] || usage
URL="$1"; AGENT="$2"; OUTDIR="$3"; CASES="${4:-[\"*\"]}"; EXCLUDE="${5:-[]}"
TIMEOUT="${AUTOBAHN_TIMEOUT:-2400}"
CONNECT_WAIT="${AUTOBAHN_CONNECT_WAIT:-15}"

if [ "${AUTOBAHN_NO_INSTALL:-0}" != 1 ]; then
  "$SCRIPT_DIR/install.sh" >&2 || { echo "fuzzingclient.sh: install.sh failed" >&2; exit 2; }
fi
[ -x "$AB_WSTEST" ] || { echo "fuzzingclient.sh: $AB_WSTEST missing; run $SCRIPT_DIR/install.sh" >&2; exit 2; }

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
rm -f "$OUTDIR/index.json" "$OUTDIR/summary.txt"

# ---- spec -----------------------------------------------------------------
python3 - "$URL" "$AGENT" "$OUTDIR" "$CASES" "$EXCLUDE" >"$OUTDIR/spec.json" <<'EOF' || exit 2
import json, sys
url, agent, outdir, cases, exclude = sys.argv[1:]
def patterns(s, what):
    s = s.strip()
    if s.startswith("["):
        v = json.loads(s)
    else:
        v = [p.strip() for p in s.split(",") if p.strip()]
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        sys.exit("fuzzingclient.sh: %s must be a JSON array of strings or a comma list: %r" % (what, s))
    return v
spec = {
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": patterns(cases, "CASES"),
    "exclude-cases": patterns(exclude, "EXCLUDE"),
    "exclude-agent-cases": {},
}
json.dump(spec, sys.stdout, indent=2)
EOF

# ---- expected cases, resolved by the installed testsuite itself -----------
"$AB_CACHE/bin/python2.7" - "$OUTDIR/spec.json" "$OUTDIR/expected-cases.json" <<'EOF' || exit 2
import json, sys
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
from autobahntestsuite.caseset import CaseSet
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
spec = json.load(open(sys.argv[1]))
unknown = [c for c in cs.resolveCasePatternList(spec["cases"]) if c not in cs.CasesIndices]
if unknown:
    sys.exit("fuzzingclient.sh: unknown case ids: %s" % " ".join(unknown))
ids = cs.parseSpecCases(spec)
if not ids:
    sys.exit("fuzzingclient.sh: the case patterns select no cases")
if spec["cases"] == ["*"] and not spec["exclude-cases"] and len(ids) != 517:
    sys.exit("fuzzingclient.sh: full suite resolved to %d cases, expected 517 (testsuite version changed?)" % len(ids))
json.dump(ids, open(sys.argv[2], "w"))
EOF
EXPECT="$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$OUTDIR/expected-cases.json")"

# ---- wait for the server --------------------------------------------------
python3 - "$URL" "$CONNECT_WAIT" <<'EOF' || exit 2
import socket, sys, time, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
if u.scheme not in ("ws", "wss") or not u.hostname:
    sys.exit("fuzzingclient.sh: URL must be ws://host[:port]/... or wss://..., got %r" % sys.argv[1])
port = u.port or (443 if u.scheme == "wss" else 80)
deadline = time.time() + float(sys.argv[2])
while True:
    try:
        socket.create_connection((u.hostname, port), timeout=2).close()
        break
    except OSError as e:
        if time.time() > deadline:
            sys.exit("fuzzingclient.sh: server %s:%d not reachable: %s" % (u.hostname, port, e))
        time.sleep(0.2)
EOF

# ---- run ------------------------------------------------------------------
LOG="$OUTDIR/wstest.log"
echo "fuzzingclient.sh: running $EXPECT cases against $URL (agent '$AGENT', timeout ${TIMEOUT}s, log $LOG)"
start=$(date +%s)
( cd "$OUTDIR" && PYTHONUNBUFFERED=1 exec timeout --kill-after=30 "$TIMEOUT" \
    "$AB_WSTEST" -m fuzzingclient -s "$OUTDIR/spec.json" ) >"$LOG" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; }
trap cleanup INT TERM
last=$start
while kill -0 "$pid" 2>/dev/null; do
  sleep 2
  now=$(date +%s)
  if [ $((now - last)) -ge 60 ]; then
    last=$now
    done_n=$(grep -c '^Running test case ID' "$LOG" 2>/dev/null || true)
    cur=$(grep '^Running test case ID' "$LOG" 2>/dev/null | tail -n1 | awk '{print $5}' || true)
    echo "fuzzingclient.sh: ... $((now - start))s, case ${done_n:-0}/$EXPECT (${cur:-?})"
  fi
done
rc=0; wait "$pid" || rc=$?
trap - INT TERM
elapsed=$(( $(date +%s) - start ))
echo "fuzzingclient.sh: wstest finished in ${elapsed}s (exit $rc)"

if [ $rc -ne 0 ] || [ ! -f "$OUTDIR/index.json" ]; then
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "fuzzingclient.sh: ERROR: wstest timed out after ${TIMEOUT}s (AUTOBAHN_TIMEOUT)" >&2
  else
    echo "fuzzingclient.sh: ERROR: wstest exited $rc without a report; last log lines:" >&2
  fi
  grep -E 'Connection to .* failed|Traceback|Error' "$LOG" | tail -n 5 >&2 || true
  tail -n 20 "$LOG" >&2
  exit 3
fi
if grep -q '^Connection to .* failed' "$LOG"; then
  echo "fuzzingclient.sh: WARNING: $(grep -m1 '^Connection to .* failed' "$LOG")" >&2
fi

# ---- check ----------------------------------------------------------------
CHECK_ARGS=(--expect "$EXPECT" --expect-cases "$OUTDIR/expected-cases.json")
[ "${AUTOBAHN_ALLOW_UNIMPLEMENTED:-0}" = 1 ] && CHECK_ARGS+=(--allow-unimplemented)
crc=0
python3 "$SCRIPT_DIR/check.py" "$OUTDIR/index.json" "$AGENT" "${CHECK_ARGS[@]}" \
  | tee "$OUTDIR/summary.txt" || crc=$?
exit $(( crc == 0 ? 0 : 1 ))
