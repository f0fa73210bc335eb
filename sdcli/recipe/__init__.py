"""Layer 2: the recipe. `sections.py`, `signal_sections.py` and `schema.py` are its schema (the
sections, the signal kinds, the whole `Recipe`); `loading.py` reads a recipe with located errors
(`yaml_document.py`: the YAML text and its lines; `overrides.py`: `key=value` on the command
line); `reference.py`, the reference the README prints. Imports only `sdcli.core`."""
