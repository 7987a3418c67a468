# Sourced by the scripts: makes .venv (once) and installs AmberDB into it with the given extras.
# Usage: . scripts/_venv.sh [extras]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
spec="."
if [ -n "${1:-}" ]; then
    spec=".[$1]"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
