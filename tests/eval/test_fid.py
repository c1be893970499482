"""FID and KID: the Frechet distance against scipy, a set against itself, and torch-fidelity's own
result on the same images with the same (locally saved, random-weight) Inception network."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from microdit.eval import fid as F
from tests.eval.conftest import shapes_images


def test_frechet_distance_equals_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg", reason="scipy is needed for the direct computation")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) + 0.3
    sa, sb = F.Statistics.of(a), F.Statistics.of(b)
    covmean = linalg.sqrtm(sa.sigma @ sb.sigma).real
    direct = float(((sa.mu - sb.mu) ** 2).sum() + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * np.trace(covmean))
    assert F.fid(sa, sb) == pytest.approx(direct, rel=1e-9)
    assert direct > 1  # a real difference, not two near-zeros
    assert F.fid(sa, sa) == pytest.approx(0.0, abs=1e-8)


def test_statistics_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    s = F.Statistics.of(rng.normal(size=(10, 4)).astype(np.float32), meta={"key": "abc"})
    back = F.Statistics.load(s.save(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    np.testing.assert_array_equal(back.features, s.features)
    assert back.count == 10 and back.meta == {"key": "abc"}
    with pytest.raises(ValueError, match="at least 2"):
        F.Statistics.of(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="do not match"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="subset size"):
        F.kid(np.zeros((5, 3)), np.zeros((5, 3)), subset_size=6)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a reference statistics file"):
        F.Statistics.load(tmp_path / "bad.npz")


def test_missing_inception_weights_name_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        F.inception_weights_path(tmp_path / "nope.pth")
    monkeypatch.setenv("MICRODIT_OFFLINE", "1")
    monkeypatch.delenv("MICRODIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(OSError, match=r"Download https://.*weights-inception.* put it at .*hub/checkpoints"):
        F.inception_weights_path(None)


@pytest.fixture(scope="module")
def feature_sets(inception_weights):
    a, _ = shapes_images(16, seed=0)
    b, _ = shapes_images(16, seed=1)
    b[:8] = 255 - b[:8]  # a visibly different distribution for half of the second set
    ex = F.InceptionFeatures(inception_weights, batch_size=8)
    return a, b, ex(a), ex(b)


def test_fid_of_a_set_against_itself_is_zero(feature_sets):
    _, _, fa, fb = feature_sets
    assert fa.shape == (16, 2048) and fa.dtype == np.float32 and fa.std() > 1e-3
    sa, sb = F.Statistics.of(fa), F.Statistics.of(fb)
    # ~0: the eigenvalues of a rank-15 product of 2048 x 2048 covariances carry rounding noise
    assert abs(F.fid(sa, sa)) < 1e-5 * np.trace(sa.sigma)
    assert F.fid(sa, sb) > 1e-2 * np.trace(sa.sigma)


def test_fid_kid_equal_torch_fidelity(feature_sets, inception_weights, tmp_path):
    a, b, fa, fb = feature_sets
    np.savez(tmp_path / "images.npz", a=a, b=b)
    script = Path(__file__).with_name("fidelity_reference.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "images.npz"), str(inception_weights), "8", "20"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    ours = F.fid(F.Statistics.of(fa), F.Statistics.of(fb))
    assert ours == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    kid_mean, kid_std = F.kid(fa, fb, subsets=20, subset_size=8)
    scale = abs(ref["kernel_inception_distance_mean"])
    assert kid_mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4, abs=1e-6 * scale)
    assert kid_std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-3)
    assert scale > 0
    print(f"FID ours {ours!r} torch-fidelity {ref['frechet_inception_distance']!r}; KID ours {kid_mean!r} +- {kid_std!r}, torch-fidelity {ref['kernel_inception_distance_mean']!r} +- {ref['kernel_inception_distance_std']!r}")
