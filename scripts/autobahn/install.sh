#!/usr/bin/env bash
# Installs the Autobahn WebSocket Testsuite (wstest, Python 2.7 only) and a
# Python 3 venv with autobahn+twisted (used by echo_server.py), entirely under
# <repo>/.cache/autobahn.  Nothing is installed system-wide and no system apt
# configuration is touched.
#
# Requirements on the host: bash, python3 (>= 3.9) with pip and venv support,
# apt-get + dpkg (Debian/Ubuntu), a C compiler (`cc`, or $CC) to build the
# wsaccel extension for Python 2.7, and network access to the Debian archive
# and PyPI.
#
# Idempotent: every step writes a stamp file once it has completed; a second
# run only checks the stamps (and the installed interpreters) and exits.
#
# Environment overrides:
#   AUTOBAHN_CACHE_DIR       default <repo>/.cache/autobahn
#   AUTOBAHN_DEBIAN_MIRROR   Debian mirror for bullseye (default: the host's
#                            configured deb.debian.org-style mirror, falling
#                            back to http://deb.debian.org/debian, then
#                            http://archive.debian.org/debian)
#   AUTOBAHN_DEBIAN_KEYRING  keyring used to verify bullseye (default
#                            /usr/share/keyrings/debian-archive-keyring.gpg)
#   AUTOBAHN_FORCE=1         redo every step
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/autobahn/common.sh
. "$SCRIPT_DIR/common.sh"

die() { echo "install.sh: ERROR: $*" >&2; exit 1; }
log() { echo "install.sh: $*" >&2; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "install.sh: FAILED (exit $rc) at line $LINENO: $BASH_COMMAND" >&2' EXIT

# ---------------------------------------------------------------- versions
PY27_DEB_PACKAGES=(
  python2.7-minimal libpython2.7-minimal libpython2.7-stdlib libpython2.7
  libpython2.7-dev
  # runtime libraries python2.7 (or its ssl/ctypes/zlib/pyexpat/bz2 modules)
  # needs; bundled so that nothing is assumed on the host but glibc.
  libssl1.1 libffi7 zlib1g libexpat1 libbz2-1.0
)
PIP_PY27_VERSION=20.3.4
PY27_BUILD_REQS=(setuptools==44.0.0 wheel==0.37.1)
WSTEST_REQ="autobahntestsuite==25.10.1"
# Transitive pins (autobahntestsuite pins its direct deps itself).
PY27_CONSTRAINTS="
Automat==22.10.0
PyHamcrest==1.10.1
argparse==1.4.0
attrs==21.4.0
cffi==1.15.1
constantly==15.1.0
enum34==1.1.10
hyperlink==21.0.0
idna==2.10
ipaddress==1.0.23
linecache2==1.0.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
pycparser==2.21
traceback2==1.4.0
typing==3.10.0.0
ujson==2.0.3
wsaccel==0.6.6
"
PY3_REQS=(autobahn==24.4.2 twisted==24.11.0 wsaccel==0.6.7)
PY3_CONSTRAINTS="
attrs==26.1.0
Automat==25.4.16
cffi==2.1.1
constantly==23.10.4
cryptography==50.0.2
hyperlink==21.0.0
idna==3.20
incremental==24.11.0
packaging==26.3
pycparser==3.12
txaio==26.6.1
typing_extensions==4.16.0
zope.interface==8.7
"

# ---------------------------------------------------------------- preflight
command -v python3 >/dev/null || die "python3 not found"
command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu host required)"
command -v dpkg >/dev/null || die "dpkg not found (Debian/Ubuntu host required)"
CC="${CC:-cc}"
command -v "${CC%% *}" >/dev/null ||
  die "no C compiler ('$CC'); needed to build wsaccel for python2.7 (e.g. apt-get install gcc)"

mkdir -p "$AB_CACHE" "$AB_CACHE/bin" "$AB_CACHE/dl"
exec 9>"$AB_CACHE/.install.lock"
if command -v flock >/dev/null; then
  flock 9 || die "could not lock $AB_CACHE/.install.lock"
fi

FORCE="${AUTOBAHN_FORCE:-0}"
export PIP_CACHE_DIR="$AB_CACHE/pip-cache"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_PYTHON_VERSION_WARNING=1
export PIP_NO_INPUT=1
unset PYTHONPATH PYTHONHOME PIP_TARGET PIP_PREFIX PIP_USER 2>/dev/null || true

stamp_ok() { # stamp_ok NAME KEY
  [ "$FORCE" != 1 ] && [ -f "$AB_CACHE/.stamp-$1" ] && [ "$(cat "$AB_CACHE/.stamp-$1")" = "$2" ]
}
stamp_set() { printf '%s' "$2" >"$AB_CACHE/.stamp-$1"; }

t0=$(date +%s)

# ------------------------------------------------- 1. python2.7 from bullseye
DEB_ARCH="$(dpkg --print-architecture)"
[ "$DEB_ARCH" = "$AB_DEB_ARCH" ] || die "unexpected dpkg arch $DEB_ARCH"

detect_mirror() {
  if [ -n "${AUTOBAHN_DEBIAN_MIRROR:-}" ]; then echo "$AUTOBAHN_DEBIAN_MIRROR"; return; fi
  # Use the same host the system's apt sources use for the main Debian archive.
  local f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(grep -vE '^[[:space:]]*#' "$f" 2>/dev/null | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)"
    if [ -n "$uri" ]; then echo "${uri%/}"; return; fi
  done
  echo "http://deb.debian.org/debian"
}

find_keyring() {
  local k="${AUTOBAHN_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
  if [ -f "$k" ]; then echo "$k"; return; fi
  # Non-Debian host (e.g. Ubuntu): fetch the debian-archive-keyring package
  # through the host's own apt configuration (download only, no install).
  local kd="$AB_CACHE/keyring"
  if [ ! -f "$kd/usr/share/keyrings/debian-archive-keyring.gpg" ]; then
    log "no Debian archive keyring on this host; downloading debian-archive-keyring via host apt"
    rm -rf "$kd" && mkdir -p "$kd/deb"
    (cd "$kd/deb" && apt-get download debian-archive-keyring >&2) ||
      die "cannot get the Debian archive keyring; set AUTOBAHN_DEBIAN_KEYRING"
    dpkg -x "$kd"/deb/*.deb "$kd"
  fi
  echo "$kd/usr/share/keyrings/debian-archive-keyring.gpg"
}

PY27_KEY="bullseye;${PY27_DEB_PACKAGES[*]}"
if stamp_ok py27 "$PY27_KEY" && "$AB_CACHE/bin/python2.7" -c 'import ssl, zlib, ctypes' 2>/dev/null; then
  log "python2.7: already installed ($AB_PY27_ROOT)"
else
  log "python2.7: downloading Debian bullseye packages"
  KEYRING="$(find_keyring)"
  APTD="$AB_CACHE/apt"
  rm -rf "$APTD" && mkdir -p "$APTD/etc" "$APTD/state/lists/partial" "$APTD/cache/archives/partial" "$APTD/debs"
  : >"$APTD/state/status"
  APT_OPTS=(
    -o "Dir::Etc::SourceList=$APTD/etc/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State=$APTD/state"
    -o "Dir::State::status=$APTD/state/status"
    -o "Dir::Cache=$APTD/cache"
    -o "APT::Architecture=$DEB_ARCH"
    -o "APT::Architectures::=$DEB_ARCH"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
    -o "Acquire::Check-Valid-Until=false"
    -o "Acquire::Languages=none"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
  )
  ok=0
  for mirror in "$(detect_mirror)" http://deb.debian.org/debian http://archive.debian.org/debian; do
    echo "deb [signed-by=$KEYRING] $mirror bullseye main" >"$APTD/etc/sources.list"
    log "python2.7: apt-get update against $mirror (bullseye, private state in $APTD)"
    if apt-get "${APT_OPTS[@]}" -q update >"$APTD/update.log" 2>&1 &&
       ! grep -qE '^(W|E): ' "$APTD/update.log"; then
      if (cd "$APTD/debs" && apt-get "${APT_OPTS[@]}" -q download "${PY27_DEB_PACKAGES[@]}" >"$APTD/download.log" 2>&1); then
        ok=1; break
      fi
      log "python2.7: download from $mirror failed:"; tail -n 5 "$APTD/download.log" >&2
    else
      log "python2.7: update from $mirror failed:"; tail -n 5 "$APTD/update.log" >&2
    fi
  done
  [ $ok = 1 ] || die "could not download python2.7 packages from Debian bullseye"
  rm -rf "$AB_PY27_ROOT" "$AB_PY27_ROOT.tmp"
  mkdir -p "$AB_PY27_ROOT.tmp"
  for deb in "$APTD"/debs/*.deb; do dpkg -x "$deb" "$AB_PY27_ROOT.tmp"; done
  mv "$AB_PY27_ROOT.tmp" "$AB_PY27_ROOT"
  mkdir -p "$AB_PY27_SITE"
  write_wrappers
  "$AB_CACHE/bin/python2.7" -c 'import ssl, zlib, ctypes, hashlib, bz2, pyexpat' ||
    die "extracted python2.7 does not work"
  stamp_set py27 "$PY27_KEY"
  rm -f "$AB_CACHE/.stamp-wstest"   # site-packages live in the prefix
  rm -rf "$APTD/cache/archives" "$APTD/state/lists"  # keep the .debs only
  log "python2.7: installed to $AB_PY27_ROOT"
fi
write_wrappers

# ------------------------------------------------- 2. pip + wstest for 2.7
PIPWHL="$AB_CACHE/dl/pip-$PIP_PY27_VERSION-py2.py3-none-any.whl"
WSTEST_KEY="$PIP_PY27_VERSION;${PY27_BUILD_REQS[*]};$WSTEST_REQ;$(echo $PY27_CONSTRAINTS)"
if stamp_ok wstest "$WSTEST_KEY" && "$AB_CACHE/bin/wstest" --autobahnversion >/dev/null 2>&1; then
  log "wstest: already installed ($AB_PY27_SITE)"
else
  if [ ! -f "$PIPWHL" ]; then
    log "wstest: downloading pip $PIP_PY27_VERSION wheel for python2.7"
    python3 -m pip download -q "pip==$PIP_PY27_VERSION" --no-deps --only-binary=:all: \
      --python-version 2.7 -d "$AB_CACHE/dl" || die "cannot download the pip $PIP_PY27_VERSION wheel"
  fi
  [ -f "$PIPWHL" ] || die "pip wheel not found at $PIPWHL"
  # Build tools (pip itself unpacked -- PEP 517 hooks can't run from a zip --
  # plus setuptools/wheel) live outside the runtime site-packages and are
  # only put on PYTHONPATH while installing.
  rm -rf "$AB_PY27_BUILDTOOLS"
  log "wstest: installing pip/setuptools/wheel for python2.7 into $AB_PY27_BUILDTOOLS"
  "$AB_CACHE/bin/python2.7" "$PIPWHL/pip" install -q --no-warn-script-location \
    --target "$AB_PY27_BUILDTOOLS" "pip==$PIP_PY27_VERSION" "${PY27_BUILD_REQS[@]}" ||
    die "cannot install pip for python2.7"
  printf '%s\n' $PY27_CONSTRAINTS >"$AB_CACHE/py27-constraints.txt"
  rm -rf "$AB_PY27_SITE" && mkdir -p "$AB_PY27_SITE"
  log "wstest: installing $WSTEST_REQ into $AB_PY27_SITE (builds wsaccel with $CC)"
  # Debian's python2.7 sysconfig hardcodes /usr/include/python2.7 and
  # x86_64-linux-gnu-gcc; point the compiler at the private headers instead.
  AUTOBAHN_KEEP_PYTHONPATH=1 PYTHONPATH="$AB_PY27_BUILDTOOLS" \
  CC="$CC" \
  CPATH="$AB_PY27_ROOT/usr/include:$AB_PY27_ROOT/usr/include/python2.7:$AB_PY27_ROOT/usr/include/$AB_TRIPLET/python2.7${CPATH:+:$CPATH}" \
    "$AB_CACHE/bin/python2.7" -m pip install -q --no-warn-script-location \
      --no-build-isolation --target "$AB_PY27_SITE" \
      -c "$AB_CACHE/py27-constraints.txt" "$WSTEST_REQ" ||
    die "pip install $WSTEST_REQ failed (python2.7)"
  "$AB_CACHE/bin/wstest" --autobahnversion >/dev/null || die "installed wstest does not run"
  "$AB_CACHE/bin/python2.7" -c 'import wsaccel.xormask, wsaccel.utf8validator' ||
    die "wsaccel is not importable (C extension build failed?)"
  stamp_set wstest "$WSTEST_KEY"
  log "wstest: installed ($AB_CACHE/bin/wstest)"
fi

# ------------------------------------------------- 3. python3 venv
PY3_KEY="$(python3 -c 'import sys; print(sys.version.split()[0])');${PY3_REQS[*]};$(echo $PY3_CONSTRAINTS)"
if stamp_ok venv "$PY3_KEY" && "$AB_VENV/bin/python" -c 'import autobahn, twisted' 2>/dev/null; then
  log "venv: already installed ($AB_VENV)"
else
  rm -rf "$AB_VENV"
  log "venv: creating $AB_VENV"
  if python3 -m venv "$AB_VENV" >/dev/null 2>&1; then
    VPIP=("$AB_VENV/bin/python" -m pip)
  else
    # Debian's python3 without python3-venv has no ensurepip: create the venv
    # without pip and drive the host's pip at it.
    rm -rf "$AB_VENV"
    python3 -m venv --without-pip "$AB_VENV" || die "python3 -m venv failed"
    python3 -m pip --version >/dev/null 2>&1 || die "python3 has neither ensurepip nor pip"
    VPIP=(python3 -m pip --python "$AB_VENV/bin/python")
  fi
  printf '%s\n' $PY3_CONSTRAINTS >"$AB_CACHE/py3-constraints.txt"
  log "venv: installing ${PY3_REQS[*]}"
  AUTOBAHN_USE_NVX=0 "${VPIP[@]}" install -q --prefer-binary \
    -c "$AB_CACHE/py3-constraints.txt" "${PY3_REQS[@]}" || die "pip install into venv failed"
  "$AB_VENV/bin/python" -c 'import autobahn, twisted, wsaccel' || die "venv imports fail"
  stamp_set venv "$PY3_KEY"
  log "venv: installed"
fi

trap - EXIT
cat <<EOF
Autobahn testsuite installed under $AB_CACHE ($(( $(date +%s) - t0 ))s)
  wstest wrapper : $AB_CACHE/bin/wstest   ($("$AB_CACHE/bin/wstest" --autobahnversion 2>/dev/null | tr '\n' ' '))
  python2.7      : $AB_CACHE/bin/python2.7 (prefix $AB_PY27_ROOT)
  python3 venv   : $AB_VENV/bin/python
Use: source $SCRIPT_DIR/env.sh
EOF
