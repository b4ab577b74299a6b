"""Training: router distillation and expert tuning, alternated in rounds (Read-ME section 4)."""
