#!/usr/bin/env bash
# Run every test of the collection: unit + integration (pytest, real netns), lint and sanity,
# the collection build, and the Molecule scenarios on Podman systemd hosts.
# Usage: scripts/test.sh [stage ...]   stages: pytest lint build molecule (default: all)
#        SIDECAR_SCENARIOS="redirect proxy" scripts/test.sh molecule   (a subset of scenarios)
#        SIDECAR_MOLECULE_JOBS=2   Molecule scenarios run side by side in this many lanes (default 2;
#                                  1 runs them one after the other), the longest first
# Installs what it needs (apt packages, the tools venv, the lab images) on first use.
# Ends with the line "N passed, N failed"; exits non-zero when anything failed.
set -uo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "$0")/env.sh"
set -e
sidecar_setup
set +e
SIDECAR_SETUP_SECONDS=$SECONDS
cd "$SIDECAR_REPO"

LOGS="$SIDECAR_REPO/.cache/test-logs"
mkdir -p "$LOGS"  # each check overwrites its own log
PASSED=0; FAILED=0; RESULTS=(); TIMES=()

record() {  # record NAME RC LOGFILE
  if [ "$2" -eq 0 ]; then
    PASSED=$((PASSED + 1)); RESULTS+=("PASS  $1")
  else
    # the first line that says why, in the summary too: CI shows only the end of the output
    local why
    # (a fatal that Ansible then reports as "...ignoring" is not why, nor Molecule's complaint that
    # the scenario "default" does not exist, which starts every scenario's log)
    why="$(awk '/^\.\.\.ignoring/ { cand = ""; next }
                /molecule\/default\/molecule.yml. glob failed/ { next }
                cand != "" { print cand; cand = ""; exit }
                /fatal: \[|FAILED!|^E +[A-Za-z]|Traceback|ERROR!|CRITICAL/ { cand = $0 }
                END { if (cand != "") print cand }' "$3" 2>/dev/null | tr -s ' ' | cut -c1-300)"
    FAILED=$((FAILED + 1)); RESULTS+=("FAIL  $1  (log: ${3#"$SIDECAR_REPO"/})${why:+
          first error: $why}")
    printf '\n----- %s failed; last lines of %s -----\n' "$1" "$3"; tail -n 60 "$3"; echo '-----'
  fi
}

check() {  # check NAME COMMAND...: one pass/fail line per command, output kept in a log
  local name="$1" log rc start
  shift
  log="$LOGS/${name//[^A-Za-z0-9_.-]/_}.log"
  start=$SECONDS
  log "$name"
  "$@" >"$log" 2>&1; rc=$?
  printf '    %s in %ss\n' "$([ $rc -eq 0 ] && echo ok || echo "FAILED (rc=$rc)")" "$((SECONDS - start))"
  TIMES+=("$((SECONDS - start))|  $name")
  record "$name" "$rc" "$log"
}

run_pytest() {  # run_pytest NAME PATH...: each pytest test counts as one result
  local name="$1" log xml rc start=$SECONDS counts p f
  shift
  log="$LOGS/pytest-$name.log"; xml="$LOGS/pytest-$name.xml"
  log "pytest ($name): $*"
  python -m pytest -q -p no:cacheprovider --junitxml="$xml" "$@" >"$log" 2>&1; rc=$?
  tail -n 1 "$log"
  printf '    finished in %ss (rc=%s)\n' "$((SECONDS - start))" "$rc"
  TIMES+=("$((SECONDS - start))|  pytest $name")
  counts="$(python - "$xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("0 0"); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skip = sum(int(s.get("skipped", 0)) for s in suites)
print(t - bad - skip, bad, skip)
PY
)"
  read -r p f skip <<<"$counts"
  PASSED=$((PASSED + p)); FAILED=$((FAILED + f))
  # pytest exits 5 when it collected nothing: that is a failure of the suite, as is any crash
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then FAILED=$((FAILED + 1)); fi
  if [ "$rc" -ne 0 ]; then
    RESULTS+=("FAIL  pytest $name ($p passed, $f failed, $skip skipped; log: .cache/test-logs/pytest-$name.log)")
    grep -E '^(FAILED|ERROR)' "$log" | head -n 40
  else
    RESULTS+=("PASS  pytest $name ($p passed, $skip skipped)")
  fi
}

stage_pytest() {
  run_pytest collection tests
  run_pytest proxy proxy/tests
}

stage_lint() {
  check "ruff (proxy)" ruff check proxy/src proxy/tests
  check "mypy (proxy)" mypy --config-file proxy/pyproject.toml proxy/src
  check "sanity + ansible-lint" bash scripts/sanity.sh
  check "changelog lint" antsibull-changelog lint
  check "prometheus rules (promtool)" bash scripts/prometheus.sh rules
  check "docs site, antsibull-docs lint, execution environment" bash scripts/tooling.sh lint site ee
}

stage_build() {
  # shellcheck disable=SC2016  # the script is expanded by the inner shell
  check "collection build + install + ansible-doc" bash -c '
    set -e
    tmp="$(mktemp -d)"; trap "rm -rf \"$tmp\"" EXIT
    ansible-galaxy collection build --force --output-path "$tmp" .
    unset PYTHONPATH
    ANSIBLE_COLLECTIONS_PATH="$tmp/inst" ansible-galaxy collection install --force -p "$tmp/inst" "$tmp"/sidecar-intercept-*.tar.gz
    for m in iptables_chains ip_rule ip_route capture_facts; do
      ANSIBLE_COLLECTIONS_PATH="$tmp/inst" ansible-doc -t module "sidecar.intercept.$m" >/dev/null
    done
    test -f "$tmp/inst/ansible_collections/sidecar/intercept/proxy/pyproject.toml"
    test ! -e "$tmp/inst/ansible_collections/sidecar/intercept/proxy/tests"
    echo "collection tarball builds, installs and documents its modules"'
}

# Molecule scenarios run side by side in SIDECAR_MOLECULE_JOBS lanes, the longest first, so that the
# long fleet scenario starts at once and the short ones fill the other lane. A scenario's weight is its
# wall time in the last run on this checkout (.cache/test-logs/molecule-durations), else the seconds
# below (measured in full runs on 2 cores), else 300. Each scenario keeps its own log and its own
# pass/fail line. What scenarios share is made safe for lanes: each has its own platform names, Podman
# network (fixed subnets 10.89.71-73, fleet 10.89.81) and Molecule ephemeral directory; the proxy
# zipapp the controller builds is published atomically under its hash.
# "matrix" is not a scenario: the support matrix's older controllers (ansible-core 2.19 and 2.20,
# scripts/tooling.sh matrix) run in a lane beside the scenarios, since they need a Podman host too.
MOLECULE_WEIGHTS="fleet=915 proxy=580 matrix=510 redirect=450 nftables=390 tproxy=360 single=290 firewall=225"

scenario_weight() {  # scenario_weight NAME: seconds, for the order
  local w kv
  w="$(awk -v s="$1" '$1 == s { w = $2 } END { print w }' "$LOGS/molecule-durations" 2>/dev/null)"
  if [ -z "$w" ]; then
    for kv in $MOLECULE_WEIGHTS; do [ "${kv%%=*}" = "$1" ] && w="${kv#*=}"; done
  fi
  echo "${w:-300}"
}

molecule_scenario() {  # molecule_scenario NAME: one scenario, in a lane; writes "rc seconds" to its result file
  local s="$1" log="$LOGS/molecule_$1.log" start=$SECONDS rc
  {
    if [ "$s" = matrix ]; then bash scripts/tooling.sh matrix; else dual_stack_network "$s" && molecule test -s "$s"; fi
  } >"$log" 2>&1; rc=$?
  echo "$rc $((SECONDS - start))" >"$LOGS/molecule_$s.result"
}

stage_molecule() {
  local s scenarios jobs pid start
  local -A running=()
  scenarios="${SIDECAR_SCENARIOS:-$(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -rn1 basename; echo matrix)}"
  jobs="${SIDECAR_MOLECULE_JOBS:-2}"
  start=$SECONDS
  bash scripts/lab-image.sh bookworm trixie trixie-nft || { record "lab images" 1 /dev/null; return; }
  case " ${scenarios//$'\n'/ } " in *" firewall "*) bash scripts/lab-image.sh bookworm-fw || { record "lab image bookworm-fw" 1 /dev/null; return; } ;; esac
  TIMES+=("$((SECONDS - start))|  lab images")
  # longest first (ties by name, so the order is stable)
  scenarios="$(for s in $scenarios; do echo "$(scenario_weight "$s") $s"; done | sort -k1,1nr -k2,2 | awk '{ print $2 }')"
  log "molecule: $(tr '\n' ' ' <<<"$scenarios")- $jobs at a time (logs: .cache/test-logs/molecule_<scenario>.log)"
  for s in $scenarios; do
    while [ "${#running[@]}" -ge "$jobs" ]; do
      wait -n 2>/dev/null
      for pid in "${!running[@]}"; do kill -0 "$pid" 2>/dev/null || { molecule_done "${running[$pid]}"; unset "running[$pid]"; }; done
    done
    rm -f "$LOGS/molecule_$s.result"
    printf '    started molecule %s (weight %ss)\n' "$s" "$(scenario_weight "$s")"
    molecule_scenario "$s" &
    running[$!]="$s"
  done
  for pid in "${!running[@]}"; do wait "$pid"; molecule_done "${running[$pid]}"; done
}

molecule_done() {  # molecule_done NAME: report a finished scenario and keep its time for the next order
  local s="$1" rc=1 secs=0
  [ -f "$LOGS/molecule_$s.result" ] && read -r rc secs <"$LOGS/molecule_$s.result"
  printf '    molecule %s: %s in %ss\n' "$s" "$([ "$rc" -eq 0 ] && echo ok || echo "FAILED (rc=$rc)")" "$secs"
  TIMES+=("$secs|  molecule $s")
  if [ "$rc" -eq 0 ]; then  # only a passing run's time is a fair weight
    { grep -v "^$s " "$LOGS/molecule-durations" 2>/dev/null; echo "$s $secs"; } >"$LOGS/molecule-durations.$$"
    mv "$LOGS/molecule-durations.$$" "$LOGS/molecule-durations"
  fi
  record "$([ "$s" = matrix ] && echo "support matrix (ansible-core$(for f in tests/requirements-matrix-*.txt; do f="${f##*-}"; printf ' %s' "${f%.txt}"; done))" || echo "molecule $s")" "$rc" "$LOGS/molecule_$s.log"
}

# A scenario with `scap_network_subnets` in its inventory runs on a Podman network with those fixed
# subnets (Molecule's podman driver can make neither a dual-stack network nor a chosen subnet): an IPv4
# subnet and optionally an IPv6 one. It is made afresh here and the scenario's destroy removes it.
dual_stack_network() {
  local spec name v4 v6 hosts
  spec="$(python3 -c 'import sys, yaml
m = yaml.safe_load(open(sys.argv[1]))
nets = m["provisioner"].get("inventory", {}).get("group_vars", {}).get("all", {}).get("scap_network_subnets")
if nets: print(m["platforms"][0]["network"], *nets, *[p["name"] for p in m["platforms"]])' "molecule/$1/molecule.yml")"
  [ -n "$spec" ] || return 0
  read -r name v4 v6 hosts <<<"$spec"
  case "$v6" in *:*) ;; *) hosts="$v6 $hosts"; v6="" ;; esac  # no IPv6 subnet: $v6 is the first host
  # what an interrupted run left (these scenarios' sequence has no destroy first): containers,
  # Molecule's state and the network. Not `molecule reset`: the podman driver's reset removes every
  # container labelled owner=molecule on the machine, which kills other scenarios running beside it.
  # shellcheck disable=SC2086  # a word list by design
  podman rm -f -t 1 $hosts >/dev/null 2>&1 || true
  molecule destroy -s "$1" >/dev/null 2>&1 || true
  podman network exists "$name" && podman network rm -f "$name" >/dev/null
  if [ -n "$v6" ]; then
    podman network create --ipv6 --subnet "$v4" --subnet "$v6" "$name" >/dev/null
  else
    podman network create --subnet "$v4" "$name" >/dev/null
  fi
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(pytest lint build molecule)
for st in "${stages[@]}"; do
  case "$st" in
    pytest|lint|build|molecule) ;;
    *) echo "unknown stage '$st' (expected pytest, lint, build or molecule)" >&2; exit 2 ;;
  esac
done
[[ "${SIDECAR_MOLECULE_JOBS:-2}" =~ ^[1-9][0-9]*$ ]] ||
  { echo "SIDECAR_MOLECULE_JOBS must be a positive number, not '$SIDECAR_MOLECULE_JOBS'" >&2; exit 2; }
run_start=$SECONDS
for st in "${stages[@]}"; do
  st_start=$SECONDS; st_row=${#TIMES[@]}; TIMES+=("")
  "stage_$st"
  TIMES[st_row]="$((SECONDS - st_start))|stage $st"
done
TIMES+=("$((SECONDS - run_start))|total (set-up before it: ${SIDECAR_SETUP_SECONDS}s)")

echo
echo "Wall time (seconds; scenarios in lanes overlap, so they add up to more than their stage):"
printf '%s\n' "${TIMES[@]}" | awk -F'|' '{ printf "  %6s  %s\n", $1, $2 }'
echo
echo "Summary (logs in .cache/test-logs/):"
printf '  %s\n' "${RESULTS[@]}"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
