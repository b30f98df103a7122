# Sphinx configuration of the sidecar.intercept docs site. scripts/tooling.sh builds it: antsibull-docs
# writes the reStructuredText of every module, filter and role (from DOCUMENTATION and the roles'
# meta/argument_specs.yml) and sphinx-build renders it with the Ansible theme.
project = 'sidecar.intercept'
copyright = 'sidecar.intercept developers'  # noqa: A001 (Sphinx's name)
title = 'sidecar.intercept documentation'
html_short_title = 'sidecar.intercept'

extensions = ['sphinx.ext.intersphinx', 'sphinx_antsibull_ext']
pygments_style = 'ansible'
highlight_language = 'YAML+Jinja'
html_theme = 'sphinx_ansible_theme'
html_show_sphinx = False
html_use_modindex = False
html_use_index = False
html_copy_source = False

# The generated pages link to a few pages of the Ansible documentation (return values common to all
# modules, action plugins, configuration). No network is needed at build time: scripts/tooling.sh writes
# a local inventory of exactly those labels, and the links point at docs.ansible.com.
intersphinx_mapping = {
    'ansible_devel': ('https://docs.ansible.com/projects/ansible/devel/', '../ansible_devel.inv'),
}

default_role = 'any'
nitpicky = True
