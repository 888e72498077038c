"""Reliability tests (issue 12): every failure path of the node pinned by a test that fails when
the guarding line is reverted. Helpers live in ``tests/reliability/harness.py``."""
