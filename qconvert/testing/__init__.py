"""Helpers for tests and demos: tiny random models built in-process, no download."""
