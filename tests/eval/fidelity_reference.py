"""torch-fidelity's own FID and KID (`calculate_metrics`) on two image sets; run as a subprocess.

usage: fidelity_reference.py IMAGES.npz WEIGHTS.pth KID_SUBSET_SIZE KID_SUBSETS  (prints JSON)

torch-fidelity's package imports torchvision for features this comparison does not use (CIFAR
and STL datasets, CLIP/VGG/DINOv2 extractors, resize-and-crop of samples). Where torchvision is
not installed (its PyPI wheels are CUDA builds), placeholder modules let the package import;
any real use of them raises.
"""
import json
import sys
import types

import numpy as np
import torch


class _Unavailable:
    def __init__(self, *a, **k):
        raise RuntimeError("torchvision is not installed: this placeholder only lets torch_fidelity import")


def _placeholder_torchvision():
    names = ["torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.models"]
    for name in names:
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr: _Unavailable
        mod.__path__ = []
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    sys.modules["torchvision"].__version__ = "0.0"


class Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def main():
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        _placeholder_torchvision()
    import torch_fidelity

    data, weights, subset, subsets = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    z = np.load(data)
    m = torch_fidelity.calculate_metrics(
        input1=Images(z["a"]), input2=Images(z["b"]), fid=True, kid=True, cuda=False, cache=False,
        verbose=False, feature_extractor="inception-v3-compat", feature_extractor_weights_path=weights,
        kid_subset_size=subset, kid_subsets=subsets, batch_size=8, save_cpu_ram=True)
    print(json.dumps({k: float(v) for k, v in m.items()}))


if __name__ == "__main__":
    main()
