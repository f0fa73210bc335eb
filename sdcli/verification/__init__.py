"""Layer 4: deciding whether a response is right. Scorers (`scorers`: built-in and user reward
functions), environments (`environments`), and the sandbox that runs model-written code
(`sandbox`; `sandbox_child` and `python_tests_child` are the programs that run inside it, started
from their source text, so they import only the standard library). Imports the recipe and core."""
