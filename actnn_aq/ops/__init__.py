"""Autograd Functions of the Q-layers: exact forward, compact saved state, torch-op backward."""
