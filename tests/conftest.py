"""Shared fixtures: the default model, loaded once per test session."""

from __future__ import annotations

import os

import pytest

import mullama


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only when asked for (``-m slow`` or ``MULLAMA_SLOW=1``)."""
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("MULLAMA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or MULLAMA_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(mullama.default_model_path())


@pytest.fixture(scope="session")
def model(model_path: str):
    m = mullama.Model.load(model_path)
    yield m
    m.close()


@pytest.fixture()
def ctx(model):
    c = mullama.Context(model, n_ctx=1024)
    yield c
    c.close()


@pytest.fixture(scope="session")
def greedy() -> mullama.SamplerParams:
    return mullama.SamplerParams(temperature=0.0)


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    """Every async test runs on trio and on asyncio."""
    return request.param


@pytest.fixture(scope="session", params=["batched", "per-context"])
def async_model(request, model_path):
    """An AsyncModel shared by the async tests (it is not bound to an event loop),
    once with the batch engine and once with a context per stream."""
    m = mullama.AsyncModel(mullama.Model.load(model_path), n_ctx=1024, n_parallel=2,
                           batching=request.param == "batched")
    yield m
    m.close()


@pytest.fixture(scope="session")
def served_model(model_path):
    """The batched AsyncModel behind the server tests (4 slots of 512 tokens)."""
    m = mullama.AsyncModel(mullama.Model.load(model_path), n_ctx=512, n_parallel=4, max_queue=64)
    yield m
    m.close()


@pytest.fixture(scope="session")
def server(served_model):
    from live_server import LiveServer
    from mullama.server import ServerSettings

    s = LiveServer(served_model, ServerSettings(port=0, max_tokens_cap=1024, max_body_bytes=1 << 20))
    yield s
    s.close()
