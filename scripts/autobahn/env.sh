# shellcheck shell=bash
# Source this file (after scripts/autobahn/install.sh) to get:
#   AUTOBAHN_CACHE   the cache root (<repo>/.cache/autobahn)
#   AUTOBAHN_WSTEST  the wstest wrapper (sets LD_LIBRARY_PATH/PYTHONHOME for
#                    its own process only)
#   AUTOBAHN_PY27    the python2.7 wrapper
#   AUTOBAHN_PY3     the python3 venv interpreter (autobahn + twisted)
#   PATH             prepended with $AUTOBAHN_CACHE/bin (only the two
#                    wrappers live there)
# Nothing else (no LD_LIBRARY_PATH, PYTHONHOME, PYTHONPATH) is exported.
# Deliberately no `set -euo pipefail` here: that would change the options of
# the shell that sources this file.
# Returns non-zero if install.sh has not been run.

# shellcheck source=scripts/autobahn/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

export AUTOBAHN_CACHE="$AB_CACHE"
export AUTOBAHN_WSTEST="$AB_WSTEST"
export AUTOBAHN_PY27="$AB_CACHE/bin/python2.7"
export AUTOBAHN_PY3="$AB_PY3"
case ":$PATH:" in
  *":$AB_CACHE/bin:"*) ;;
  *) export PATH="$AB_CACHE/bin:$PATH" ;;
esac

if [ ! -x "$AUTOBAHN_WSTEST" ] || [ ! -x "$AUTOBAHN_PY3" ]; then
  echo "autobahn env.sh: not installed under $AB_CACHE; run $AB_SCRIPTS/install.sh" >&2
  # shellcheck disable=SC2317
  return 1 2>/dev/null || exit 1
fi
