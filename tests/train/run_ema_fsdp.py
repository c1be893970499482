"""Under torchrun: the EMA of an FSDP2 model stays sharded, updates without communication, and equals
the EMA of the same model unsharded. Prints one JSON line on rank 0.

usage: run_ema_fsdp.py STEPS
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from microdit.models.microdit import MicroDiT  # noqa: E402
from microdit.models.presets import preset_config  # noqa: E402
from microdit.train import distributed  # noqa: E402
from microdit.train.ema import EMA  # noqa: E402


def main():
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    steps = int(sys.argv[1])
    info = distributed.setup("cpu")
    torch.set_num_threads(1)
    cfg = preset_config("MicroDiT_Test_2", in_channels=4, input_size=8, caption_channels=32)
    torch.manual_seed(0)
    plain = MicroDiT(cfg).initialize_weights()
    sharded = MicroDiT(cfg)
    sharded.load_state_dict(plain.state_dict())
    distributed.wrap(sharded, info, "fsdp")
    ema_plain, ema_sharded = EMA(plain, 0.9, start_step=1), EMA(sharded, 0.9, start_step=1)
    collectives = 0
    for step in range(steps):
        # The same change on both models: whole tensors for the plain one, each rank's shard for the other.
        g = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for (name, p), (_, q) in zip(plain.named_parameters(), sharded.named_parameters()):
                delta = torch.randn(p.shape, generator=g) * 0.01
                p.add_(delta)
                q.to_local().add_(distribute_tensor(delta, q.device_mesh, q.placements, src_data_rank=None).to_local())
        ema_plain.update(plain, step)
        with CommDebugMode() as comm:
            ema_sharded.update(sharded, step)
        collectives += comm.get_total_counts()
    local = sum(v.to_local().numel() if hasattr(v, "to_local") else v.numel() for v in ema_sharded.shadow.values())
    full = ema_sharded.full_state_dict()
    same = all(torch.equal(full[k], v) for k, v in ema_plain.shadow.items())
    worst = max(float((full[k] - v).abs().max()) for k, v in ema_plain.shadow.items())
    if info.is_main:
        print(json.dumps({"collectives_in_update": collectives, "identical": same, "max_abs_diff": worst,
                          "local_numel": local, "full_numel": sum(v.numel() for v in full.values()),
                          "sharded_entries": sum(hasattr(v, "to_local") for v in ema_sharded.shadow.values())}))
    distributed.teardown()


if __name__ == "__main__":
    main()
