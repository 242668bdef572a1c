import datasets
import huggingface_hub.constants
import pytest


@pytest.fixture
def offline(monkeypatch):
    """No network waits: the env vars cover subprocesses, but datasets and huggingface_hub read them at import
    time, so the already-imported module constants are patched too (otherwise a Hub lookup retries for ~25 s)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
