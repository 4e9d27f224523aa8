#!/usr/bin/env bash
# Make (once) the project's virtual environment and keep its dependencies in step with pyproject.toml.
#
# Why outside the checkout: torch alone is several GB; one venv per machine (LSTI_VENV, default
# ~/.cache/lsti/venv) serves every clone, and pip's cache is kept. Only the dependencies are installed:
# the code runs from the checkout through PYTHONPATH, so two clones never fight over an editable install.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LSTI_VENV:-$HOME/.cache/lsti/venv}
python=${LSTI_PYTHON:-python3}

"$python" - <<'PY' || { echo "error: Python >= 3.11 is required (set LSTI_PYTHON)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

deps=$("$python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))
PY
)
want=$(printf '%s\n' "$deps" | sha1sum | cut -c1-40)
stamp="$venv/.lsti-deps"
if [ ! -x "$venv/bin/python" ]; then
  echo ">> creating the virtual environment $venv (first use only)" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo ">> installing dependencies into $venv (torch is large: first use only)" >&2
  # shellcheck disable=SC2086
  printf '%s\n' "$deps" > "$venv/.lsti-requirements.txt"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$venv/.lsti-requirements.txt" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
