#!/usr/bin/env bash
# Sanity gate for the collection: `ansible-test sanity` and `ansible-lint --profile production`.
#
# Usage: scripts/sanity.sh [--untracked] [--no-lint] [ansible-test sanity options, e.g. --test validate-modules]
#   --untracked  also check files git does not track yet (default: tracked files only, as CI sees them)
#   --no-lint    ansible-test sanity only (the support matrix runs it with another ansible-core)
# Prints "SANITY PASSED" or "SANITY FAILED: <gates>" at the end; exits non-zero on any failure.
#
# How it works here, without get-pip.py:
# - ansible-test needs the collection at .../ansible_collections/sidecar/intercept, so the tracked files
#   (working-tree content) are copied into a temporary tree of that shape, removed again on exit.
# - ansible-test runs the single-version tests (ansible-doc, validate-modules, pylint, pep8, yamllint,
#   runtime-metadata, changelog, ...) in virtualenvs it creates itself, even without --venv, and
#   bootstraps pip into them with get-pip.py downloaded from ci-files.testing.ansible.com, which is not
#   reachable from this network. The bootstrap script is looked up in ~/.ansible/test/cache first, so
#   this script points HOME (for ansible-test only) at its own cache directory and puts a stand-in
#   there that installs pip from the interpreter's bundled wheel (ensurepip). The test requirements
#   that ansible-test pins are then installed by pip from the package index, once: the virtualenvs are
#   reused until ansible-test's pins change.
# - shellcheck needs the `shellcheck` binary: installed from Debian when missing and running as root;
#   otherwise ansible-test warns and skips it. Not run: pslint (no PowerShell here, and the collection
#   has no .ps1 files).
# - Any error reported by a test that runs fails the gate. tests/sanity/ignore-X.Y.txt files are used
#   only when present.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
if ! command -v ansible-test >/dev/null 2>&1 || { ! command -v ansible-lint >/dev/null 2>&1 && [[ " $* " != *" --no-lint "* ]]; }; then
  # not called from test.sh: get the tools venv and the collection path the usual way
  # shellcheck source=scripts/env.sh
  . "$here/env.sh"
  sidecar_setup
fi

# ansible-test's shellcheck test needs the binary (Debian package shellcheck, about 10 s to install)
if ! command -v shellcheck >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck; } \
    >/dev/null 2>&1 || echo "warning: could not install shellcheck; ansible-test will skip that test" >&2
fi

untracked=0 lint=1
while [ $# -gt 0 ]; do
  case "$1" in
    --untracked) untracked=1; shift ;;
    --no-lint) lint=0; shift ;;
    *) break ;;
  esac
done

cache="${SIDECAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-intercept}"
test_home="$cache/ansible-test-home"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/sidecar-sanity.XXXXXX")"
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

failed=()
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. the collection tree ansible-test wants: what `ansible-galaxy collection build` ships (galaxy.yml's
#    build_ignore applies, so proxy/tests and proxy/benchmarks - linted by ruff and mypy - stay out)
dest="$tmp/ansible_collections/sidecar/intercept"
mkdir -p "$dest"
cat >"$tmp/ignore.py" <<'PY'
import fnmatch, sys, yaml
with open(sys.argv[1]) as fh:
    patterns = (yaml.safe_load(fh) or {}).get('build_ignore') or []
def ignored(path):
    parts = path.split('/')
    return any(fnmatch.fnmatch('/'.join(parts[:i]), p) for p in patterns for i in range(1, len(parts) + 1))
for name in sys.stdin.buffer.read().split(b'\0'):
    if name and not ignored(name.decode()):
        sys.stdout.buffer.write(name + b'\0')
PY
(
  cd "$repo" || exit 1
  { git ls-files -z; if [ "$untracked" = 1 ]; then git ls-files -z --others --exclude-standard; fi; } |
    while IFS= read -r -d '' f; do
      [ -e "$f" ] || continue   # deleted in the working tree
      printf '%s\0' "$f"
    done | python "$tmp/ignore.py" galaxy.yml | xargs -0 -r cp --parents -P -t "$dest"
) || { echo "SANITY FAILED: could not copy the collection" >&2; exit 1; }

# 2. the pip bootstrap stand-in, for the pip version this ansible-test pins
pyver="$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
pipver="$(python - <<'PY'
import os, re, ansible_test
src = open(os.path.join(os.path.dirname(ansible_test.__file__), '_internal', 'python_requirements.py')).read()
m = re.search(r"pip='([0-9.]+)'", src)
print(m.group(1) if m else '')
PY
)"
if [ -n "$pipver" ]; then
  mkdir -p "$test_home/.ansible/test/cache"
  cat >"$test_home/.ansible/test/cache/get_pip_${pipver//./_}.py" <<'PY'
"""Stand-in for get-pip.py (written by scripts/sanity.sh): pip from the bundled wheel, then pip install."""
import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
subprocess.check_call([sys.executable, '-m', 'ensurepip', '--default-pip'], stdout=subprocess.DEVNULL)
sys.exit(subprocess.call([sys.executable, '-m', 'pip', 'install', '--upgrade', '--force-reinstall'] + args))
PY
else
  echo "warning: cannot tell which pip ansible-test bootstraps; it may try to download get-pip.py" >&2
fi

# 3. ansible-test sanity
say "ansible-test sanity --python $pyver $*"
(
  cd "$dest" || exit 1
  HOME="$test_home" ANSIBLE_COLLECTIONS_PATH="$tmp" ANSIBLE_COLLECTIONS_PATHS="$tmp" \
    ansible-test sanity --python "$pyver" --color no "$@"
) || failed+=("ansible-test sanity")

# 4. ansible-lint exactly as a contributor runs it: plain `ansible-lint` (no arguments, .ansible-lint's
#    production profile) at the top of a checkout that is NOT inside an ansible_collections/ tree, with no
#    collection path of ours set. ansible-lint then installs the checkout into its .ansible/collections
#    itself, so the collection's own modules resolve there as they do for anyone who clones it.
if [ "$lint" = 1 ]; then
  checkout="$tmp/checkout"
  mkdir -p "$checkout"
  (
    cd "$repo" || exit 1
    { git ls-files -z; if [ "$untracked" = 1 ]; then git ls-files -z --others --exclude-standard; fi; } |
      while IFS= read -r -d '' f; do
        [ -e "$f" ] || continue
        printf '%s\0' "$f"
      done | xargs -0 -r cp --parents -P -t "$checkout"
    git -C "$checkout" init -q  # ansible-lint finds the project root by its .git directory
  ) || failed+=("ansible-lint (copy of the checkout)")
  say "ansible-lint (plain, in a checkout outside ansible_collections/)"
  (
    cd "$checkout" || exit 1
    env -u ANSIBLE_COLLECTIONS_PATH -u ANSIBLE_COLLECTIONS_PATHS -u PYTHONPATH ansible-lint --nocolor
  ) || failed+=("ansible-lint")
fi

echo
if [ ${#failed[@]} -eq 0 ]; then
  echo "SANITY PASSED (ansible-test sanity$([ "$lint" = 1 ] && echo ', ansible-lint with the production profile'))"
else
  echo "SANITY FAILED: ${failed[*]}"
  exit 1
fi
