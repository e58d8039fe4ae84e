"""Stage 2, train: recipes, datasets, metrics, the QAT + distillation loop (one process or DDP),
distillation settings and losses, the Hessian-trace layer ranking."""
