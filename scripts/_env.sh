# Sourced by scripts/serve, scripts/test and scripts/check: a project virtualenv with
# Simwire installed (editable) and, when asked, the Debian packages the tests talk to.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${SIMWIRE_VENV:-$ROOT/.venv}"

ensure_venv() {  # $1 = extras, e.g. "dev" ("" for the server alone)
  local extras="${1:-}" stamp spec="."
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Simwire needs Python >= 3.11 ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  [ -z "$extras" ] || spec=".[$extras]"
  stamp="$VENV/.simwire-${extras:-base}-$(sha1sum pyproject.toml | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$spec"
    touch "$stamp"
  fi
}

ensure_debian_packages() {  # the real peers of the interop tests
  local missing=()
  command -v coap-client-openssl >/dev/null || missing+=(libcoap3-bin)
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v openssl >/dev/null || missing+=(openssl)
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} with apt-get" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    echo "warning: ${missing[*]} not installed and no apt-get; interop tests will skip" >&2
  fi
}
