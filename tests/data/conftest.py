"""Fixtures for the shared-memory layer tests."""

from __future__ import annotations

import secrets

import pytest


@pytest.fixture
def run_id() -> str:
    """A run name no other test (or concurrent test session) uses, so reaps stay local."""
    return "t" + secrets.token_hex(6)
