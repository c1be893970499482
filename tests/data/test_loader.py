"""ShardLoader: epochs, rank sharding, workers, caption dropout, exact resume."""
import itertools

import numpy as np
import pytest
import torch

from microdit.data.loader import BatchPlan, ShardLoader, sample_uniform
from microdit.data.prepare import prepare
from microdit.data.shards import ShardDataset
from tests.data.shard_fixtures import TinyTextEncoder

N = 90


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "shapes"
    prepare("shapes", out, num=N, seed=2, resolutions=[16], shard_size=16, workers=0,
            text_encoder=TinyTextEncoder(), progress=False)
    return out


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_batches_match_the_dataset(root):
    ds = ShardDataset(root)
    loader = ShardLoader(root, 8, seed=0)
    b = next(loader)
    assert b["latents"].shape == (8, 3, 16, 16) and b["latents"].dtype == torch.float32
    assert b["caption_states"].shape == (8, 24, 8) and b["caption_mask"].shape == (8, 24)
    assert b["index"].dtype == torch.int64 and len(b["captions"]) == 8
    for j, i in enumerate(b["index"].tolist()):
        item = ds[i]
        assert torch.equal(b["latents"][j], item["latents"]) and b["captions"][j] == item["caption"]
        assert torch.equal(b["caption_states"][j], item["caption_states"])


def test_each_epoch_is_a_seeded_permutation(root):
    loader = ShardLoader(root, 9, seed=4, drop_last=False)
    assert len(loader) == 10
    epochs = [torch.cat([b["index"] for b in _take(loader, 10)]).tolist() for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(N))
    again = torch.cat([b["index"] for b in _take(ShardLoader(root, 9, seed=4, drop_last=False), 10)]).tolist()
    assert again == epochs[0]
    other = torch.cat([b["index"] for b in _take(ShardLoader(root, 9, seed=5, drop_last=False), 10)]).tolist()
    assert other != epochs[0]
    plain = torch.cat([b["index"] for b in _take(ShardLoader(root, 9, shuffle=False, drop_last=False), 10)])
    assert plain.tolist() == list(range(N))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_are_disjoint_and_cover_the_epoch(root, world_size):
    per_rank = []
    for rank in range(world_size):
        loader = ShardLoader(root, 5, rank=rank, world_size=world_size, seed=1, drop_last=True)
        assert len(loader) == (N // world_size) // 5  # equal on every rank: no rank waits at a collective
        per_rank.append(torch.cat([b["index"] for b in _take(loader, len(loader))]).tolist())
    flat = list(itertools.chain(*per_rank))
    assert len(flat) == len(set(flat))  # disjoint
    plan = BatchPlan(N, 5, 0, world_size, seed=1, drop_last=True)
    assert set(flat) == set(plan.epoch_order(0)[: world_size * len(per_rank[0])].tolist())
    if N % (world_size * 5) == 0:
        assert sorted(flat) == list(range(N))  # covering
    # drop_last=False covers every sample, padding by wrapping around as DistributedSampler does.
    covered = set()
    for rank in range(world_size):
        loader = ShardLoader(root, 7, rank=rank, world_size=world_size, seed=1, drop_last=False)
        covered |= set(torch.cat([b["index"] for b in _take(loader, len(loader))]).tolist())
    assert covered == set(range(N))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(root, num_workers):
    kw = dict(seed=3, caption_dropout=0.3, num_workers=num_workers, drop_last=False)
    full = ShardLoader(root, 8, **kw)
    reference = _take(full, 27)  # crosses two epoch boundaries (12 batches per epoch)
    full.close()
    first = ShardLoader(root, 8, **kw)
    _take(first, 13)
    state = first.state_dict()
    first.close()
    assert (state["epoch"], state["batch"]) == (1, 1)
    resumed = ShardLoader(root, 8, **dict(kw, seed=999))  # the seed comes from the state
    resumed.load_state_dict(state)
    for a, b in zip(reference[13:], _take(resumed, 14)):
        _same(a, b)
    resumed.close()


def test_workers_give_the_same_batches_as_the_main_process(root):
    a = _take(ShardLoader(root, 8, seed=6, caption_dropout=0.5), 23)
    loader = ShardLoader(root, 8, seed=6, caption_dropout=0.5, num_workers=2)
    b = _take(loader, 23)
    loader.close()
    for x, y in zip(a, b):
        _same(x, y)


def test_caption_dropout_is_seeded_per_sample_and_epoch(root):
    loader = ShardLoader(root, 10, seed=0, caption_dropout=0.4, drop_last=False)
    batches = _take(loader, 2 * len(loader))
    dropped = torch.cat([b["caption_dropped"] for b in batches])
    assert 0.2 < dropped.float().mean() < 0.6
    for b in batches:
        d = b["caption_dropped"]
        assert (b["caption_states"][d] == 0).all() and not b["caption_mask"][d].any()
        assert b["caption_mask"][~d].any(dim=1).all()  # kept captions keep their tokens
    # The decision depends on (seed, epoch, sample), not on the batch size or position.
    other = ShardLoader(root, 3, seed=0, caption_dropout=0.4, drop_last=False)
    first_epoch = {}
    for b in _take(other, len(other)):
        first_epoch.update(zip(b["index"].tolist(), b["caption_dropped"].tolist()))
    mine = {}
    for b in batches[: len(loader)]:
        mine.update(zip(b["index"].tolist(), b["caption_dropped"].tolist()))
    assert mine == first_epoch
    u = sample_uniform(0, 0, np.arange(1000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.05
    assert not np.array_equal(u, sample_uniform(0, 1, np.arange(1000)))


def test_loader_errors(root):
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardLoader(root, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no batch of 100"):
        ShardLoader(root, 100)
    with pytest.raises(ValueError, match="caption_dropout"):
        ShardLoader(root, 4, caption_dropout=1.5)
    loader = ShardLoader(root, 4)
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        loader.load_state_dict(dict(ShardLoader(root, 8).state_dict()))
