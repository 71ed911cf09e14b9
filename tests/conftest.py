"""Shared test settings.

Tests that take a `device` argument run once per device listed in LLM_SCRATCH_TEST_DEVICES (comma-separated,
default "cpu"), e.g. on a GPU machine:

    LLM_SCRATCH_TEST_DEVICES=cpu,cuda python -m pytest

A listed device that this machine does not have stops the run with an error (it is never skipped silently).
"""

import os

import pytest
import torch

DEVICES = [d.strip() for d in os.environ.get("LLM_SCRATCH_TEST_DEVICES", "cpu").split(",") if d.strip()]


def pytest_configure(config):
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    for d in DEVICES:
        if not available.get(d.split(":")[0], False):
            raise pytest.UsageError(f"LLM_SCRATCH_TEST_DEVICES lists {d!r}, which this machine does not have "
                                    f"(available: {[k for k, v in available.items() if v]})")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the post-training tests' models are too small to gain from threads,
    and a shared machine runs them faster this way. Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def counting_compile():
    """A stand-in for gpt2.maybe_compile (monkeypatch it into a script) that wraps each module it is asked to
    compile in a counter of forward calls, instead of compiling (a CPU compile takes too long for a test).
    -> (maybe_compile, calls): calls[i] = forward calls of the i-th module compiled."""
    calls = []

    class Counted(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.i = module, len(calls)
            calls.append(0)

        def forward(self, *args, **kwargs):
            calls[self.i] += 1
            return self.module(*args, **kwargs)

        def __getattr__(self, name):  # like torch.compile's wrapper: the module's attributes show through
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return (lambda module, enabled: Counted(module) if enabled else module), calls


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: every requests.get raises ConnectionError, the download cache is an empty folder, the HF hub
    is huggingface.co. -> the cache folder (LLM_SCRATCH_CACHE), where the error messages say to put the files."""
    import requests

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("offline")
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path / "cache"
