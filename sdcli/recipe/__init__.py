"""Layer 2: the recipe: its schema, loading with located errors, overrides, and the reference the
README prints (`config`). Imports only `sdcli.core`."""
