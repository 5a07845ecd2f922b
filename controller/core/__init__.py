"""The pure decision core: models, sizing, estimators, policy.

Nothing in this package performs I/O or reads a clock; time and observations
come in as arguments (enforced by import-linter, see pyproject.toml).
"""
