#!/usr/bin/env bash
# The test command of the README and of CI (.ci/run calls this very script, so they cannot drift).
# Installs everything from the project's own files into ./.venv, then runs the whole suite on the CPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k config`).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" dev
set +e
python -m pytest tests -q -ra --durations=15 "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit $rc
