"""Simulated low-bit weight and activation quantization (torch only)."""
