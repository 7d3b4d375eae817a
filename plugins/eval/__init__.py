"""Evaluation plugins: measure the policy before, during and after training."""
