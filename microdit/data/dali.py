"""An NVIDIA DALI pipeline over the latent shards, batch for batch the same as `ShardLoader`.

The batch plan (order, rank split, caption dropout) is `ShardLoader`'s own `BatchPlan`; the
shards' memory-mapped arrays are fed by `fn.external_source` in their storage dtype, and DALI
casts them to float32, applies caption dropout and (with `device_id` set) moves them to the GPU
in its prefetching executor. `device_id=None` runs CPU-only, which needs no GPU or CUDA driver.
Needs `nvidia-dali-cuda130` (`microdit.availability.dali_reasons()` says why not).
"""
from __future__ import annotations


import numpy as np
import torch

from ..availability import dali, dali_reasons
from .loader import BatchPlan, PlannedLoader, open_dataset
from .shards import ShardDataset


def _require(device_id):
    reasons = dali_reasons("cuda" if device_id is not None else "cpu")
    if reasons:
        raise RuntimeError("the DALI loader cannot run: " + "; ".join(reasons))


class DALILoader(PlannedLoader):
    """An endless, resumable iterator of training batches made by a DALI pipeline (see module doc)."""

    def __init__(self, root, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 resolution: int | None = None, caption_dropout: float = 0.0, drop_last: bool = True,
                 shuffle: bool = True, device_id: int | None = None, num_threads: int = 2,
                 prefetch_queue_depth: int = 2, verify: bool = False):
        _require(device_id)
        self.dataset = root if isinstance(root, ShardDataset) else open_dataset(root, resolution, verify=verify)
        self.plan = BatchPlan(len(self.dataset), batch_size, rank, world_size, seed, shuffle, drop_last,
                              caption_dropout)
        self.device_id, self.num_threads, self.prefetch_queue_depth = device_id, num_threads, prefetch_queue_depth
        self._position = 0
        self._pipe = None
        self._batches = None

    def _build(self, start: int):
        """A DALI pipeline whose iteration k is batch position start + k."""
        mod = dali()
        from nvidia.dali import fn, types

        ds, plan = self.dataset, self.plan
        specs = ds.tensor_specs()
        lat_code = specs[ds.latents_name]["dtype"]
        states_code = specs["caption_states"]["dtype"]
        positions = plan.positions(start)

        def source():
            epoch, _, idx = next(positions)  # DALI asks for iterations in order, prefetch included
            arrays = ds.gather(idx)
            keep = (~plan.dropped(epoch, idx)).astype(np.uint8)
            return (arrays[ds.latents_name], arrays["caption_states"],
                    arrays["caption_mask"].astype(np.uint8), idx.astype(np.int64), keep)

        def to_float(x, code):
            if code == "BF16":  # bfloat16 is the top half of a float32: widen the bits, reinterpret
                return fn.reinterpret(fn.cast(x, dtype=types.UINT32) * np.uint32(65536), dtype=types.FLOAT)
            return fn.cast(x, dtype=types.FLOAT)

        @mod.pipeline_def(batch_size=plan.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                          prefetch_queue_depth=self.prefetch_queue_depth)
        def pipeline():
            lat, states, mask, index, keep = fn.external_source(source=source, num_outputs=5, batch=True)
            if self.device_id is not None:
                lat, states, mask, keep = lat.gpu(), states.gpu(), mask.gpu(), keep.gpu()
            lat = to_float(lat, lat_code)
            states = to_float(states, states_code) * fn.cast(keep, dtype=types.FLOAT)
            mask = mask * keep
            return lat, states, mask, index, keep

        pipe = pipeline()
        pipe.build()
        return pipe

    def _to_torch(self, tl, dtype=None) -> torch.Tensor:
        from nvidia.dali.tensors import TensorListGPU

        if not isinstance(tl, TensorListGPU):  # CPU-only runs, and the index (kept on the host)
            out = torch.from_numpy(np.array(tl.as_tensor()))
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=f"cuda:{self.device_id}")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        return out if dtype is None else out.to(dtype)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pipe is None:
            self._pipe = self._build(self._position)
        lat, states, mask, index, keep = self._pipe.run()
        idx = self._to_torch(index).cpu()
        captions = self.dataset.captions
        self._position += 1
        return {"latents": self._to_torch(lat), "caption_states": self._to_torch(states),
                "caption_mask": self._to_torch(mask, torch.bool), "captions": [captions[i] for i in idx.tolist()],
                "index": idx, "caption_dropped": ~self._to_torch(keep, torch.bool).cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` (of this loader or a ShardLoader with the same settings)."""
        self._pipe = None
        self.plan, self._position = self.plan.resume(state)
