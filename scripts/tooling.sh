#!/usr/bin/env bash
# The collection's contributor tooling that is not lint or sanity, each step as the tests run it:
#   lint   antsibull-docs lint-collection-docs --plugin-docs (modules, filters, roles' argument_specs)
#   site   the docs site: antsibull-docs writes the reStructuredText of every module, filter plugin and
#          role, sphinx-build renders it (warnings are errors) into .cache/docs-site/html (or $1 of site)
#   ee     ansible-builder create: renders execution-environment.yml into a build context (no image
#          build: that needs a container registry for the base image)
# Usage: scripts/tooling.sh [lint|site [DIR]|ee]...   (default: lint site ee). Exits non-zero on any failure.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v antsibull-docs >/dev/null 2>&1 || [ -z "${ANSIBLE_COLLECTIONS_PATH:-}" ]; then
  # shellcheck source=scripts/env.sh
  . "$here/env.sh"
  sidecar_setup
fi
repo="$(cd "$here/.." && pwd)"
collection="$(python -c 'import ansible_collections.sidecar.intercept as c, os; print(os.path.dirname(c.__file__) if c.__file__ else list(c.__path__)[0])' 2>/dev/null)"
[ -n "$collection" ] || collection="$(cd "$repo/.cache/collections/ansible_collections/sidecar/intercept" && pwd)"
failed=()
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
tmp="$(mktemp -d "${TMPDIR:-/tmp}/sidecar-tooling.XXXXXX")"  # 0700: antsibull-docs insists on that
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

step_lint() {
  say "antsibull-docs lint-collection-docs --plugin-docs"
  (cd "$collection" && antsibull-docs lint-collection-docs --plugin-docs .) || failed+=("antsibull-docs lint")
}

# The labels of the Ansible documentation that antsibull-docs' pages refer to, and their pages there:
# written as a local intersphinx inventory, so the site builds without network and links to them.
ansible_inventory() {
  python - "$1" <<'PY'
import sys, zlib
labels = {
    "common_return_values": ("reference_appendices/common_return_values.html#common-return-values", "Return Values"),
    "action_plugins": ("plugins/action.html#action-plugins", "Action plugins"),
    "ansible_configuration_settings": ("reference_appendices/config.html#ansible-configuration-settings", "Ansible Configuration Settings"),
}
body = "".join("%s std:label -1 %s %s\n" % (name, uri, title) for name, (uri, title) in sorted(labels.items()))
with open(sys.argv[1], "wb") as fh:
    fh.write(b"# Sphinx inventory version 2\n# Project: Ansible\n# Version: devel\n"
             b"# The remainder of this file is compressed using zlib.\n" + zlib.compress(body.encode()))
PY
}

step_site() {
  local out="${1:-$repo/.cache/docs-site}" src="$tmp/site"
  say "docs site: antsibull-docs collection + sphinx-build -> $out/html"
  mkdir -m 0700 "$src" "$src/rst"
  cp "$repo/docs/site/conf.py" "$src/"
  ansible_inventory "$src/ansible_devel.inv" &&
  antsibull-docs --config-file "$repo/docs/site/antsibull-docs.cfg" collection --use-current \
    --squash-hierarchy --fail-on-error --cleanup everything --dest-dir "$src/rst" sidecar.intercept &&
  rm -rf "$out/html" && mkdir -p "$out" &&
  sphinx-build -q -b html -c "$src" -W --keep-going "$src/rst" "$out/html" &&
  for page in index proxy_role capture_role iptables_chains_module settings_module capture_rules_filter; do
    [ -s "$out/html/$page.html" ] || { echo "missing page $page.html" >&2; exit 1; }
  done && echo "docs site: $out/html/index.html" || failed+=("docs site")
}

step_ee() {
  # as README documents it, in a scratch directory: the tarball `ansible-galaxy collection build` makes
  # beside execution-environment.yml, `ansible-builder create`, then the build context's own collection
  # requirements installed the way its galaxy stage does (from /build, here from _build)
  local d="$tmp/ee"
  say "ansible-builder create (execution-environment.yml) + its galaxy stage's collection install"
  mkdir -p "$d" && cp "$repo/execution-environment.yml" "$d/" &&
  ansible-galaxy collection build --force --output-path "$d" "$repo" >/dev/null &&
  (cd "$d" && ansible-builder create --file execution-environment.yml --context context -v 2) &&
  test -s "$d/context/Containerfile" &&
  (cd "$d/context/_build" && env -u PYTHONPATH ANSIBLE_COLLECTIONS_PATH="$d/installed" ANSIBLE_GALAXY_DISABLE_GPG_VERIFY=1 \
     ansible-galaxy collection install -r requirements.yml --collections-path "$d/installed") &&
  test -f "$d/installed/ansible_collections/sidecar/intercept/MANIFEST.json" &&
  env -u PYTHONPATH ANSIBLE_COLLECTIONS_PATH="$d/installed" ansible-doc -t module sidecar.intercept.settings 2>&1 |
    grep '^> MODULE sidecar.intercept.settings' >/dev/null &&
  echo "execution environment: build context renders, and its requirements install sidecar.intercept" ||
    failed+=("ansible-builder create")
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(lint site ee)
while [ ${#steps[@]} -gt 0 ]; do
  case "${steps[0]}" in
    lint) step_lint ;;
    site) if [ ${#steps[@]} -gt 1 ] && [[ "${steps[1]}" != lint && "${steps[1]}" != ee ]]; then
            step_site "${steps[1]}"; steps=("${steps[@]:1}"); else step_site; fi ;;
    ee) step_ee ;;
    *) echo "unknown step '${steps[0]}' (lint, site [DIR], ee)" >&2; exit 2 ;;
  esac
  steps=("${steps[@]:1}")
done
if [ ${#failed[@]} -eq 0 ]; then echo "TOOLING PASSED"; else echo "TOOLING FAILED: ${failed[*]}"; exit 1; fi
