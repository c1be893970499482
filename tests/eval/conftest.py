"""Fixtures for the metric tests: tiny local metric models (built once per session) and shapes images."""
import numpy as np
import pytest

from microdit import availability


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    if not availability.torch_fidelity_inception():
        pytest.skip(f"FID needs torch-fidelity (the `eval` extra): {availability.torch_fidelity_inception()!r}")
    from tests.eval.tiny_models import make_inception

    return make_inception(tmp_path_factory.mktemp("inception") / "inception_random.pth")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    if not availability.transformers():
        pytest.skip(f"CLIP score needs transformers: {availability.transformers()!r}")
    from tests.eval.tiny_models import make_clip

    return make_clip(tmp_path_factory.mktemp("clip"))


def shapes_images(n: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, list[str]]:
    from microdit.data.shapes import ShapesDataset

    ds = ShapesDataset(n, resolution=resolution, seed=seed)
    items = [ds[i] for i in range(n)]
    return np.stack([it["image"] for it in items]), [it["caption"] for it in items]
