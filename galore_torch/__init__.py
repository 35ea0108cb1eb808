"""Optimizers for stable low-precision LLM pretraining (torch only)."""
