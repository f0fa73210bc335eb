"""Layer 4: deciding whether a response is right. Scorers (`scorers`: built-in and user reward
functions), environments (`environments`; the built-in one is `python_tests`, which
`python_tests_feedback` scores), and the sandbox that runs model-written code (`sandbox`, built
on `sandbox_bubblewrap`, `sandbox_process`, `sandbox_launch` and `sandbox_result`;
`sandbox_child`, `sandbox_guard` and `python_tests_child` are what runs inside it, started from
their source text, so they import only the standard library). Imports the recipe and core."""
