import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"

@pytest.fixture(scope="session")
def reference():
    """Test vectors made with the published code (copied from shared/reference)."""
    return torch.load(ASSETS / "microdit_tiny_reference.pt", weights_only=False)

@pytest.fixture(scope="session")
def xl_tensor_list():
    """[(name, shape)] of the published MicroDiT_XL_2 checkpoint."""
    rows = (ASSETS / "microdit_xl2_state_dict.tsv").read_text().splitlines()[1:]
    out = []
    for row in rows:
        name, shape, _ = row.split("\t")
        out.append((name, tuple(int(s) for s in shape.split("x"))))
    return out

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
