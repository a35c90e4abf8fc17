from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _zoo_cache(tmp_path_factory):
    """Tokenized corpora and trained tokenizers go to a temporary cache, not ~/.cache/zoo."""
    import os

    old = os.environ.get("ZOO_CACHE")
    os.environ["ZOO_CACHE"] = str(tmp_path_factory.mktemp("zoo-cache"))
    yield
    if old is None:
        os.environ.pop("ZOO_CACHE", None)
    else:
        os.environ["ZOO_CACHE"] = old
