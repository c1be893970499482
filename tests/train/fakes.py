"""A tiny in-memory stand-in for the shard loader: same API, deterministic, rank-sliced."""
import torch


class MemoryLoader:
    """Infinite batches of (latents, caption_states); rank r takes samples r, r + W, ... of each global batch."""

    def __init__(self, n=64, batch_size=4, rank=0, world_size=1, channels=4, size=8, caption=(5, 32), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, channels, size, size, generator=g)
        self.captions = torch.randn(n, *caption, generator=g)
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.position = 0  # global batches consumed

    def __iter__(self):
        while True:
            n = len(self.latents)
            start = self.position * self.batch_size * self.world + self.rank
            idx = torch.arange(start, start + self.batch_size * self.world, self.world) % n
            self.position += 1
            yield {"latents": self.latents[idx], "caption_states": self.captions[idx], "index": idx}

    def get_batch(self, indices):
        """Samples `indices` (the validation set's view of the same data)."""
        idx = torch.as_tensor(list(indices))
        return {"latents": self.latents[idx], "caption_states": self.captions[idx]}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, sd):
        self.position = sd["position"]


DATA_INFO = {"channels": 4, "latent_size": 8, "caption_dim": 32, "caption_len": 5}
