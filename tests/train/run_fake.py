"""Runs the trainer on the in-memory loader; used by the tests as a subprocess (and under torchrun).

usage: run_fake.py OUT STEPS MICRO GLOBAL [--resume] [--check-ranks] [--val] [key=value ...]
(--val: validation on 12 held-out samples of the loader's data; set val.every)
"""
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from microdit.train import distributed  # noqa: E402
from microdit.train.config import load_config  # noqa: E402
from microdit.train.trainer import Trainer  # noqa: E402
from tests.train.fakes import DATA_INFO, MemoryLoader  # noqa: E402


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if hasattr(v, "full_tensor"):  # FSDP2 shards: compare the whole tensor (a collective)
            v = v.full_tensor()
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    out, steps, micro, glob = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    flags = {a for a in sys.argv[5:] if a.startswith("--")}
    extra = [a for a in sys.argv[5:] if not a.startswith("--")]
    cfg = load_config(None, ["model.preset=MicroDiT_Test_2", f"train.steps={steps}", f"train.micro_batch={micro}",
                             f"train.global_batch={glob}", "train.log_every=1", "train.ckpt_every=2",
                             "train.keep_checkpoints=100", "train.tensorboard=false", "optim.warmup_steps=2",
                             f"out={out}"] + extra)
    info = distributed.setup("cpu")
    torch.set_num_threads(1)
    loader = MemoryLoader(batch_size=micro, rank=info.rank, world_size=info.world_size)
    record = []

    def check(trainer, loss):
        entry = {"step": trainer.step, "loss": distributed.all_reduce_mean(loss.detach(), info).item()}
        if "--check-ranks" in flags:
            digest = weights_digest(trainer.raw)
            digests = [None] * info.world_size
            torch.distributed.all_gather_object(digests, digest)
            entry["digests"] = digests
        record.append(entry)

    validator = None
    if "--val" in flags:
        from microdit.train.validation import HeldOut, Validator

        validator = Validator(cfg.val, HeldOut(loader, range(52, 64)), cfg.diffusion)
    trainer = Trainer(cfg, loader, DATA_INFO, dist_info=info, resume="--resume" in flags, callbacks=[check],
                      validator=validator)
    trainer.run()
    if info.is_main:
        Path(out, "record.json").write_text(json.dumps(record))
    distributed.teardown()


if __name__ == "__main__":
    main()
