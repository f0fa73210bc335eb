"""Layer 6: evaluation. Eval sets, greedy scoring and drift (`evaluate`), the continual-learning
matrix (`continual_matrix`), plots and summaries (`report`). Imports verification, models, the
recipe and core; never a signal or the training loop."""
