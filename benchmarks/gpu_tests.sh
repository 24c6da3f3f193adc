#!/bin/bash
# GPU tests inside a device call's time limit, with a log that keeps what ran: pytest is sent SIGINT at the limit
# (killed 20 s later if it has not stopped), so an interrupted run still prints the tracebacks of its failures and its
# summary, which a plain `timeout` (SIGTERM) loses with the session. The log's first line names the commit, the GPU
# and the command.
#   bash benchmarks/gpu_tests.sh LOG LIMIT_S PYTEST_ARGS...
#   e.g. bash benchmarks/gpu_tests.sh $OUT/gpu.log 450 tests/gpu/test_memory_gpu.py tests/gpu/test_spec_decode_gpu.py
set -uo pipefail
if [ $# -lt 3 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
  echo "usage: bash benchmarks/gpu_tests.sh LOG LIMIT_S PYTEST_ARGS... (LIMIT_S in whole seconds)" >&2; exit 2
fi
log=$1 limit=$2
shift 2
rev=$(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown)
# A device copy's .git can be older than its working tree: say so rather than name a commit that did not run.
changed=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)
[ "$changed" -gt 0 ] && rev="$rev with $changed tracked files changed"
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "# commit $rev on ${gpu:-no GPU}: python3 -m pytest -v -rfE --tb=short $* (${limit} s limit, SIGINT)" > "$log"
timeout -s INT -k 20 "$limit" python3 -m pytest -v -rfE --tb=short -p no:cacheprovider "$@" >> "$log" 2>&1
rc=$?
echo "pytest rc $rc$([ $rc -eq 124 ] && echo ' (stopped at the time limit)')" >> "$log"
grep -E "^(FAILED|ERROR) |passed|failed|rc " "$log" | tail -12
exit $rc
