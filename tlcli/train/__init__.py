"""Learning on features: recipes, extraction, the head, fine-tuning, cross-validation, evaluation, export."""
