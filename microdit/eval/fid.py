"""FID and KID on Inception-v3 pool features, computed the way torch-fidelity computes them.

The features come from torch-fidelity's `FeatureExtractorInceptionV3` (the TensorFlow FID
Inception graph ported to PyTorch, with TF1-compatible bilinear resizing to 299 inside the
network), so numbers match the original TF FID code and torch-fidelity. The statistics, the
Frechet distance and the kernel (KID) distance follow torch-fidelity's definitions (tested
equal to torch-fidelity's own `calculate_metrics` on the same images and network).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import availability

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FEATURE = "2048"  # pool3 features, the FID/KID layer


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"}
               for k in ("MICRODIT_OFFLINE", "HF_HUB_OFFLINE"))


def inception_weights_path(spec: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `spec`, else $MICRODIT_INCEPTION_WEIGHTS, else torch hub's cache
    (where torch-fidelity keeps them), downloading them there unless offline."""
    if spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {str(spec)!r}: no such file (torch-fidelity's "
                                    f"{INCEPTION_FILE}, from {INCEPTION_URL})")
        return path
    if os.environ.get("MICRODIT_INCEPTION_WEIGHTS"):
        return inception_weights_path(os.environ["MICRODIT_INCEPTION_WEIGHTS"])
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    err = "offline (MICRODIT_OFFLINE or HF_HUB_OFFLINE is set)"
    if not _offline():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
            return cached
        except Exception as e:  # no network, proxy, disk: all end in the same instruction
            err = f"{type(e).__name__}: {e}"
    raise OSError(f"Inception-v3 weights for FID not found ({err}). Download {INCEPTION_URL} on a machine "
                  f"with internet and put it at {cached}, or pass its path (--inception PATH, the protocol's "
                  f"metrics.inception, or MICRODIT_INCEPTION_WEIGHTS).")


class InceptionFeatures:
    """uint8 RGB images (N, H, W, 3), any size -> float32 (N, 2048) pool features (torch-fidelity's network)."""

    def __init__(self, weights=None, device="cpu", batch_size: int = 64):
        module = availability.torch_fidelity_inception()
        self.path = inception_weights_path(weights)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = module.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE],
                                                      feature_extractor_weights_path=str(self.path)).to(self.device)
        self.sha256 = file_sha256(self.path)

    def metadata(self) -> dict:
        return {"library": "torch-fidelity", "version": importlib.metadata.version("torch-fidelity"),
                "extractor": "inception-v3-compat", "feature": FEATURE, "resize": "inside the network: "
                "TF1-compatible bilinear to 299x299", "weights": str(self.path), "weights_sha256": self.sha256}

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Inception features need uint8 (N, H, W, 3) images; got {images.dtype} {images.shape}")
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[start:start + self.batch_size]).permute(0, 3, 1, 2).contiguous()
            out.append(self.net(x.to(self.device))[0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, int(FEATURE)), np.float32)


@dataclass
class Statistics:
    """Mean and covariance of a feature set (float64), with the features themselves when kept (for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def of(cls, features: np.ndarray, keep_features: bool = True, meta: dict | None = None) -> "Statistics":
        features = np.asarray(features)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"statistics need at least 2 feature vectors (N, D); got shape {features.shape}")
        f64 = features.astype(np.float64)
        return cls(f64.mean(axis=0), np.cov(f64, rowvar=False), len(features),
                   features if keep_features else None, dict(meta or {}))

    def save(self, path) -> Path:
        """An .npz (mu, sigma, count, features if kept, meta as JSON), written atomically."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.asarray(self.count),
                  "meta": np.asarray(json.dumps(self.meta, sort_keys=True))}
        if self.features is not None:
            arrays["features"] = self.features
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "Statistics":
        import json

        try:
            with np.load(path, allow_pickle=False) as z:
                feats = z["features"] if "features" in z.files else None
                return cls(z["mu"], z["sigma"], int(z["count"]), feats,
                           json.loads(str(z["meta"])) if "meta" in z.files else {})
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a reference statistics file (mu, sigma, count): {e}") from e


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2 (real and
    non-negative for two covariances, up to rounding), as torch-fidelity computes it: no
    matrix square-root iteration to fail on the singular covariances of small sets.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(a: Statistics, b: Statistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float | None, coef0: float) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y * gamma + coef0)^degree, gamma 1/D by default."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (x @ x.T * gamma + coef0) ** degree
    kyy = (y @ y.T * gamma + coef0) ** degree
    kxy = (x @ y.T * gamma + coef0) ** degree
    m = len(x)
    off = (kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))
    return float(off / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kid(features_1, features_2, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over `subsets` random subsets), torch-fidelity's definition
    and subset draws (numpy RandomState(seed), two draws without replacement per subset)."""
    # float64 kernels: torch-fidelity sums float32 ones; the difference is rounding only.
    f1, f2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs two (N, D) feature sets of one width; got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < subset_size:
        raise ValueError(f"KID subset size {subset_size} is larger than a feature set ({len(f1)}, {len(f2)} "
                         f"images): lower the protocol's metrics.kid_subset_size")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        a = f1[rng.choice(len(f1), subset_size, replace=False)]
        b = f2[rng.choice(len(f2), subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(a, b, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())
