"""The DALI loader reads the same shards and yields the same batches as ShardLoader."""
import pytest
import torch

from microdit.availability import dali_reasons
from microdit.data.loader import ShardLoader
from microdit.data.prepare import prepare
from tests.data.shard_fixtures import TinyTextEncoder, make_image_folder

pytestmark = pytest.mark.skipif(bool(dali_reasons("cpu")), reason="; ".join(dali_reasons("cpu")) or "DALI runs")


@pytest.fixture(scope="module")
def shapes_minilm(tmp_path_factory):
    out = tmp_path_factory.mktemp("dali") / "shapes"
    prepare("shapes", out, num=20, seed=9, shard_size=8, workers=0, text_encoder="minilm", progress=False)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("dali_folder")
    make_image_folder(base / "imgs", n_good=11, bad=True)
    out = base / "out"
    prepare(base / "imgs", out, resolutions=[16], shard_size=4, workers=0, text_encoder=TinyTextEncoder(),
            progress=False)
    return out


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _compare(root, n_batches, **kw):
    from microdit.data.dali import DALILoader

    ref, dali = ShardLoader(root, **kw), DALILoader(root, **kw)
    for _ in range(n_batches):
        _same(next(ref), next(dali))
    return ref, dali


def test_shapes_with_minilm_same_batches(shapes_minilm):
    _compare(shapes_minilm, 9, batch_size=6, seed=1, caption_dropout=0.3, drop_last=False)  # 4 per epoch


@pytest.mark.parametrize("rank", [0, 1])
def test_image_folder_same_batches_per_rank(folder, rank):
    _compare(folder, 5, batch_size=2, rank=rank, world_size=2, seed=2, caption_dropout=0.5)


def test_bfloat16_storage_same_batches(tmp_path):
    prepare("shapes", tmp_path / "bf16", num=12, resolutions=[8], dtype="bfloat16", workers=0,
            text_encoder=TinyTextEncoder(), progress=False)
    _compare(tmp_path / "bf16", 4, batch_size=4, seed=0)


def test_resume_across_loaders(folder):
    from microdit.data.dali import DALILoader

    kw = dict(batch_size=3, seed=5, caption_dropout=0.2, drop_last=False)
    ref, dali = _compare(folder, 3, **kw)
    state = dali.state_dict()
    assert state == ref.state_dict()
    fresh = ShardLoader(folder, **kw)
    fresh.load_state_dict(state)
    dali2 = DALILoader(folder, **kw)
    dali2.load_state_dict(ref.state_dict())
    for _ in range(4):
        a = next(ref)
        _same(a, next(fresh))
        _same(a, next(dali2))


@pytest.mark.gpu
def test_gpu_pipeline_matches(folder):
    from microdit.data.dali import DALILoader

    kw = dict(batch_size=2, seed=2, caption_dropout=0.5)
    ref, dali = ShardLoader(folder, **kw), DALILoader(folder, device_id=0, **kw)
    for _ in range(3):
        a, b = next(ref), next(dali)
        assert b["latents"].is_cuda
        _same(a, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()})
