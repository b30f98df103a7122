#!/usr/bin/env bash
# The collection's contributor tooling that is not lint or sanity, each step as the tests run it:
#   lint   antsibull-docs lint-collection-docs --plugin-docs (modules, filters, roles' argument_specs)
#   site   the docs site: antsibull-docs writes the reStructuredText of every module, filter plugin and
#          role, sphinx-build renders it (warnings are errors) into .cache/docs-site/html (or $1 of site)
#   ee     ansible-builder create: renders execution-environment.yml into a build context (no image
#          build: that needs a container registry for the base image)
#   matrix the support matrix's other controllers (README "Support matrix"): for each
#          tests/requirements-matrix-X.Y.txt, ansible-core X.Y in its own venv on the Python its
#          "# python:" line names: the unit tests, ansible-test sanity, and tests/matrix/converge.yml on a
#          fresh Podman systemd host over SSH twice (the second run changed=0); then the tools venv's newest
#          ansible-core re-runs it: changed=0 and no deprecation warning.
# Usage: scripts/tooling.sh [lint|site [DIR]|ee|matrix]...   (default: all four). Exits non-zero on any failure.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v antsibull-docs >/dev/null 2>&1 || [ -z "${ANSIBLE_COLLECTIONS_PATH:-}" ]; then
  # shellcheck source=scripts/env.sh
  . "$here/env.sh"
  sidecar_setup
fi
repo="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/ssh-hosts.sh
. "$here/ssh-hosts.sh"
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

# a matrix venv: one ansible-core release on the Python its requirements file names ("# python: X.Y"),
# keyed by that file
matrix_venv() {  # matrix_venv REQUIREMENTS_FILE: sets MATRIX_VENV
  local req="$1" want py="" c key
  want="$(sed -n 's/^# python: *\([0-9.]*\).*/\1/p' "$req")"
  [ -n "$want" ] || { echo "$req names no Python ('# python: X.Y')" >&2; return 1; }
  for c in "python$want" "$HOME"/.pyenv/versions/"$want".*/bin/python3; do
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys, venv; sys.exit("%d.%d" % sys.version_info[:2] != sys.argv[1])' "$want" 2>/dev/null; then
      py="$(command -v "$c")"; break
    fi
  done
  [ -n "$py" ] || { echo "no Python $want found for $(basename "$req")" >&2; return 1; }
  key="$( (cat "$req"; "$py" -VV) | sha256sum | cut -c1-12)"
  MATRIX_VENV="$SIDECAR_CACHE/venv-matrix-$key"
  if [ ! -x "$MATRIX_VENV/bin/ansible-playbook" ]; then
    rm -rf "$MATRIX_VENV"
    if ! { "$py" -m venv "$MATRIX_VENV" &&
           "$MATRIX_VENV/bin/pip" install -q --disable-pip-version-check -r "$req"; } >"$tmp/matrix-pip.log" 2>&1; then
      tail -n 20 "$tmp/matrix-pip.log" >&2; rm -rf "$MATRIX_VENV"; return 1
    fi
  fi
}

# one converge run: playbook output kept, PLAY RECAP checked; $1 = label, $2 = expected changed (any|0)
matrix_converge() {
  local label="$1" expect="$2" log="$tmp/converge-$1.log" start=$SECONDS
  ansible-playbook -i "$tmp/matrix-inventory" "$repo/tests/matrix/converge.yml" >"$log" 2>&1
  local rc=$? recap
  recap="$(grep -E '^tl-matrix-[0-9]+ +:' "$log" | tail -n 1)"
  printf '    %s: %s (%ss)\n' "$label" "${recap#*: }" "$((SECONDS - start))"
  if [ $rc -ne 0 ] || ! grep -q 'failed=0' <<<"$recap"; then tail -n 40 "$log"; return 1; fi
  if [ "$expect" = 0 ] && ! grep -q ' changed=0 ' <<<"$recap"; then
    echo "not idempotent: $label changed something" >&2; grep -B1 -A3 '^changed:' "$log" | head -n 40; return 1
  fi
  if grep -n 'DEPRECATION' "$log"; then echo "deprecation warnings in $label" >&2; return 1; fi
}

# one controller of the matrix: unit tests, sanity, converge + idempotence on a fresh host, newest re-run
matrix_release() {  # matrix_release REQUIREMENTS_FILE
  local req="$1" rel host="tl-matrix-$$" newest
  rel="$(basename "$req" .txt)"; rel="${rel#requirements-matrix-}"
  matrix_venv "$req" || { failed+=("matrix $rel: venv"); return; }
  say "support matrix: $("$MATRIX_VENV/bin/ansible" --version 2>&1 | sed -n 1p) on $("$MATRIX_VENV/bin/python" -V)"
  (cd "$repo" && PATH="$MATRIX_VENV/bin:$PATH" python -m pytest -q -p no:cacheprovider tests/unit) ||
    failed+=("matrix $rel: unit tests")
  PATH="$MATRIX_VENV/bin:$PATH" bash "$repo/scripts/sanity.sh" --no-lint >"$tmp/matrix-sanity-$rel.log" 2>&1 ||
    { tail -n 60 "$tmp/matrix-sanity-$rel.log"; failed+=("matrix $rel: ansible-test sanity"); }
  tail -n 1 "$tmp/matrix-sanity-$rel.log"
  # a fresh systemd host from the lab image on Podman's default network, reached over SSH as root with
  # a key made for this run (scripts/ssh-hosts.sh, which also waits for the boot to finish: systemd
  # mounts /tmp while it boots, and a module copied there earlier would vanish)
  podman rm -f -t 1 "$host" >/dev/null 2>&1
  podman run -d --name "$host" --hostname "$host" --systemd=always --cap-add NET_ADMIN,NET_RAW \
    --security-opt unmask=/proc/sys "${SIDECAR_LAB_IMAGE:-localhost/sidecar-lab}:bookworm" /sbin/init >/dev/null ||
    { failed+=("matrix $rel: host"); return; }
  local key addr
  if ! { key="$(SSH_HOSTS_USER=root ssh_hosts_key "$tmp/ssh")" &&
          SSH_HOSTS_USER=root ssh_hosts_authorize "$key.pub" "$host" &&
          addr="$(podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$host")" &&
          [ -n "$addr" ]; }; then
    failed+=("matrix $rel: SSH to the host"); podman rm -f -t 1 "$host" >/dev/null 2>&1; return
  fi
  printf '%s ansible_host=%s ansible_python_interpreter=/usr/bin/python3\n[all:vars]\n' "$host" "$addr" >"$tmp/matrix-inventory"
  SSH_HOSTS_USER=root ssh_hosts_vars "$key" "" | sed 's/: /=/; s/^\(ansible_ssh_common_args=\)\(.*\)$/\1"\2"/' >>"$tmp/matrix-inventory"
  newest="$(python -c 'from ansible.release import __version__ as v; print(v)')"
  (
    export ANSIBLE_PIPELINING=true
    PATH="$MATRIX_VENV/bin:$PATH" matrix_converge "ansible-core $rel converge" any &&
    PATH="$MATRIX_VENV/bin:$PATH" matrix_converge "ansible-core $rel idempotence" 0 &&
    matrix_converge "ansible-core $newest re-run" 0
  ) || failed+=("matrix $rel: converge")
  podman rm -f -t 1 "$host" >/dev/null 2>&1
}

step_matrix() {
  local req
  bash "$repo/scripts/lab-image.sh" bookworm >/dev/null || { failed+=("matrix: lab image"); return; }
  trap 'podman rm -f -t 1 "tl-matrix-$$" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
  for req in "$repo"/tests/requirements-matrix-*.txt; do
    matrix_release "$req"
  done
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(lint site ee matrix)
while [ ${#steps[@]} -gt 0 ]; do
  case "${steps[0]}" in
    lint) step_lint ;;
    site) if [ ${#steps[@]} -gt 1 ] && [[ ! "${steps[1]}" =~ ^(lint|ee|matrix)$ ]]; then
            step_site "${steps[1]}"; steps=("${steps[@]:1}"); else step_site; fi ;;
    ee) step_ee ;;
    matrix) step_matrix ;;
    *) echo "unknown step '${steps[0]}' (lint, site [DIR], ee, matrix)" >&2; exit 2 ;;
  esac
  steps=("${steps[@]:1}")
done
if [ ${#failed[@]} -eq 0 ]; then echo "TOOLING PASSED"; else echo "TOOLING FAILED: ${failed[*]}"; exit 1; fi
