"""Shared test helpers: plain references of Q-Pert and of the official code, tiny models, fixture data."""
