#!/usr/bin/env bash
# Mutation testing of one maths module with mutmut 3 (not part of CI: pip install mutmut==3.8.1 first).
#   tests/mutation/run.sh treg/solvers/fast.py tests/test_fast.py [more test files or pytest -k args ...]
# Copies the working tree to a scratch folder, writes mutmut's setup.cfg there (so the repository keeps no
# tool config), mutates only MODULE, runs only the given tests for each mutant, and prints the score and the
# surviving mutants. Set MUTMUT_FILTER to one or more space-separated globs of mutant names
# (e.g. 'treg.solvers.fast.x_ddrm* treg.solvers.fast.x_cci_table*') to run a subset.
set -euo pipefail
module=$1; shift
[ $# -ge 1 ] || { echo "usage: $0 MODULE TEST_FILE [TEST_FILE ...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
scratch=${MUTATION_DIR:-$(mktemp -d /tmp/mutation.XXXXXX)}
mkdir -p "$scratch"
(cd "$root" && git ls-files -co --exclude-standard | grep -v '^tests/mutation/' | tar -cf - -T -) | tar -xf - -C "$scratch"
cd "$scratch"
python "$root/tests/mutation/undecorate.py" "$module"  # mutmut skips decorated functions (the solvers' loops)
{
  echo "[mutmut]"
  echo "source_paths=treg"
  echo "only_mutate=$module"
  echo "also_copy="
  for p in samples configs solve.py; do echo "    $p"; done
  echo "pytest_add_cli_args_test_selection="
  for t in "$@"; do echo "    $t"; done
  printf "pytest_add_cli_args=\n    -q\n    -p\n    no:cacheprovider\n"
  echo "process_isolation=forkserver"
} > setup.cfg
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
read -ra filters <<< "${MUTMUT_FILTER:-}"
python -m mutmut run --max-children "${MUTMUT_CHILDREN:-1}" "${filters[@]}" >mutmut.log 2>&1 || { tail -30 mutmut.log; exit 1; }
python -m mutmut results --all true > results.txt 2>&1 || true
python - "$module" <<'PY'
import collections, re, sys
counts = collections.Counter()
survivors = []
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m:
        counts[m.group(2)] += 1
        if m.group(2) == "survived":
            survivors.append(m.group(1))
killed = counts["killed"] + counts.get("timeout", 0)
total = sum(counts.values())
print(f"{sys.argv[1]}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%); " +
      ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
print("\n".join(f"  survived: {s}" for s in survivors))
PY
echo "scratch folder: $scratch (mutmut show NAME there prints a mutant's diff)"
