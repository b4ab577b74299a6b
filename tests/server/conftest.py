"""One tiny model folder and one `readmoe serve` on it, shared by the server's test modules
(a server takes a few seconds to start)."""

from __future__ import annotations

import openai
import pytest

from tests.server.helpers import ServerProcess, save_tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="session")
def server(model_dir):
    with ServerProcess(model_dir, "--served-model-name", "tiny", "--max-seqs", "4") as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c
