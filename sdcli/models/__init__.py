"""Layer 3: the model and what is stored of it. Loading a base (`model`, `quantization`,
`builtin_model`, `model_folder`), adapters stacked and merged (`stack`, `merge`), episode folders
and the run lock (`episodes`, `runlock`, `source`), and running the model: prompt encoding and
scoring (`sequences`) and sampling (`rollout`), which evaluation and training share. Imports the
recipe and core."""
