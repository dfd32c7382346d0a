"""Shared test helpers: paths to NeMo's reference fixtures in ../shared.

A user's clone has no ../shared: tests that need it skip with a clear message.
In CI (CI=true) a missing fixture is a failure, so a wrong path cannot pass.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import caster

ROOT = Path(__file__).resolve().parent.parent
NEMO_FIXTURES = ROOT.parent / "shared" / "fixtures" / "nemo"
DATA = Path(__file__).resolve().parent / "data"

EN_MODEL = "tiny_streaming_rnnt"
PROMPT_MODEL = "tiny_streaming_rnnt_prompt"
# The languages each fixture model is tested in.
LANGUAGES = {EN_MODEL: [None], PROMPT_MODEL: ["en-US", "de-DE", "fr-FR", "auto"]}


def unavailable(message: str) -> None:
    """Skip a test whose material or tool is missing here; in CI (CI=true) fail instead,
    since CI installs everything and a skip there would hide a broken setup."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_fixture(path: Path) -> Path:
    if not path.exists():
        unavailable(f"NeMo fixture missing: {path} (needs the ../shared checkout)")
    return path


def nemo_path(model: str) -> Path:
    return require_fixture(NEMO_FIXTURES / f"{model}.nemo")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The fixture models are tiny: one thread runs them fastest, several only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[EN_MODEL, PROMPT_MODEL])
def model(request) -> caster.Model:
    """Each NeMo-built fixture model in turn (files with their own `model` override it)."""
    m = caster.load(nemo_path(request.param))
    m.name = request.param
    return m


@functools.cache
def _oracle() -> tuple[dict[str, np.ndarray], dict]:
    z = np.load(require_fixture(NEMO_FIXTURES / "oracle.npz"))
    meta = json.loads((NEMO_FIXTURES / "oracle.json").read_text())
    return {k: z[k] for k in z.files}, meta


@pytest.fixture(scope="session")
def oracle() -> dict[str, np.ndarray]:
    """NeMo's recorded arrays, keyed as in ../shared/fixtures/nemo/README.md."""
    return _oracle()[0]


@pytest.fixture(scope="session")
def oracle_meta() -> dict:
    return _oracle()[1]
