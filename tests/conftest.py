"""Shared fixtures: the embedded corpus is built (and its BPE trained) once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory) -> str:
    from mpt_jax.data import sources

    data_dir = str(tmp_path_factory.mktemp("data"))
    sources.build_stdlib_corpus(data_dir)
    return data_dir
