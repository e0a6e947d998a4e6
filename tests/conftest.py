import os
from pathlib import Path

import pytest
import torch

# Tests point the data loaders at the shared data folder that sits beside the repository.
SHARED = Path(os.environ.get("BONDGATE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"
if DATA.exists():  # the library's loaders find the shared data through $BONDGATE_DATA, like a user's data root
    os.environ.setdefault("BONDGATE_DATA", str(DATA))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


#: every device test runs on the CPU, and on CUDA where one is present (skipped otherwise)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
