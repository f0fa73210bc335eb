"""Layer 7: training. The loop (`train`), the teacher roles and EMA adapter (`teacher`), the
divergences (`losses`), checkpoints (`checkpoint`), data-parallel ranks (`distributed`), memory
and TensorBoard logging, and the shipped anchor prompts (`anchors/`). Imports every layer below:
evaluation (run after each episode), signals, verification, models, the recipe and core."""
