"""Sphinx configuration of cbn's API reference (``pip install ".[docs]"``, then
``python -m sphinx -W -b html docs docs/_build/html``).

Sphinx with autodoc, autosummary and numpydoc: the docstrings are numpydoc already, every
public name gets its own page (``api/generated/cbn.batch_norm.html``), cross-references
between them resolve, and ``-W`` turns any docstring that does not parse into an error.
The reference documents the package that ``import cbn`` finds: build it where the compiled
module is importable (an installed cbn, or ``pip install -e .``).
"""

import os
import sys

import cbn

project = "cbn"
author = "the cbn developers"
copyright = "the cbn developers"
release = version = cbn.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "numpydoc"]
templates_path = ["_templates"]
exclude_patterns = ["_build", "performance.md", "**/README.md"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"

# One page per public name, generated at build time into api/generated (git-ignored).
autosummary_generate = True
autosummary_imported_members = True
# Signatures show names and defaults only, as NumPy's reference does: the types are in each
# Parameters section (numpydoc), and annotations would print numpy.typing.ArrayLike as its
# long private Union (or, with autodoc_type_aliases, as "TypeAliasForwardRef('ArrayLike')").
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}

numpydoc_show_class_members = False        # the class template lists the members itself
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_title = f"cbn {release}"
html_static_path = []
html_theme_options = {"description": "Batch normalization for NumPy arrays on the CPU",
                      "page_width": "1100px", "sidebar_width": "230px"}

# Doctests run in pytest (tests/test_doctests.py), not here.
sys.path.insert(0, os.path.abspath(".."))
