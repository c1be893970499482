"""The MicroDiT network: patch-mixer, deferred masking, expert-choice MoE, layer-wise scaling."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..nn.layers import (
    CaptionEmbedder,
    CrossAttention,
    ExpertChoiceMoE,
    PatchEmbed,
    ProjectionMLP,
    SelfAttention,
    SwiGLU,
    TimestepEmbedder,
    attention_width,
    gelu_tanh,
    layer_norm,
    modulate,
    moe_hidden,
    bound_op,
    swiglu_hidden,
)
from ..ops.opset import OpSet, build_ops
from ..ops.unmask_unpatchify import unpatchify
from .config import MicroDiTConfig


def sincos_pos_table(dim: int, grid: int, base: int, interp_scale: float) -> np.ndarray:
    """(grid*grid, dim) 2-D sin-cos table; first half of channels from the column coordinate."""
    coords = np.arange(grid, dtype=np.float64) / (grid / base) / interp_scale
    ww, hh = np.meshgrid(coords, coords)  # ww varies along columns, hh along rows

    def axis(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(ww), axis(hh)], axis=1)


class Block(nn.Module):
    """adaLN-modulated self-attention, unmodulated cross-attention, modulated FFN (dense or MoE).

    Each LayerNorm + modulate is one ln_modulate op, and each gated residual add is fused with
    the LayerNorm after it (residual_ln_modulate), the FFN's into the next block's norm1 when
    the model chains its blocks (MicroDiT.run_blocks); with the `reference` backends this is the
    published sequence of operations, one after the other."""

    def __init__(self, dim, cond_dim, attn_width, head_dim, ffn, eps, bias, ops: OpSet | None = None):
        super().__init__()
        self.eps = eps
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, attn_width, head_dim, eps, bias, ops)
        self.cross_attn = CrossAttention(dim, dim, head_dim, eps, bias, ops)
        self.norm2 = layer_norm(dim, eps)
        self.norm3 = layer_norm(dim, eps)
        self.mlp = ffn
        self.adaLN_modulation = nn.Sequential(gelu_tanh(), nn.Linear(cond_dim, 6 * dim, bias=True))
        self.ln_modulate = bound_op(ops, "ln_modulate")
        self.residual_ln_modulate = bound_op(ops, "residual_ln_modulate")

    def forward(self, x, y, c, mod=None, kv=None, pending=None, defer: bool = False):
        """`mod` (B, 6d) and `kv` (B, L, 2d): this block's adaLN output and caption K/V, when the
        model computed those of all blocks at once (one GEMM each). `pending` (branch, gate):
        the previous block's FFN output and gate2, not yet added to x: added here, fused with
        norm1 + modulate (residual_ln_modulate). `defer`: return (x, FFN output, gate2) instead
        of their gated sum, for the next block to fuse the same way."""
        mod = self.adaLN_modulation(c) if mod is None else mod  # (B, 6d)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (B, d)
        # norm2 is not modulated: shift = scale = 0 (two tensors: one passed twice to an
        # autograd.Function is a graph break under torch.compile)
        zero_shift, zero_scale = torch.zeros_like(shift1), torch.zeros_like(scale1)
        if pending is None:
            h = self.ln_modulate(x, self.norm1.weight, shift1, scale1, self.eps)  # (B, N, d)
        else:
            x, h = self.residual_ln_modulate(x, *pending, self.norm1.weight, shift1, scale1, self.eps)  # (B, N, d) x 2
        x, h = self.residual_ln_modulate(x, self.attn(h), gate1, self.norm2.weight, zero_shift, zero_scale,
                                         self.eps)  # (B, N, d) x 2
        x, h = self.residual_ln_modulate(x, self.cross_attn(h, y, kv), None, self.norm3.weight, shift2, scale2,
                                         self.eps)  # (B, N, d) x 2
        out = self.mlp(h)  # (B, N, d)
        return (x, out, gate2) if defer else x + gate2.unsqueeze(1) * out  # (B, N, d)


class CaptionBlock(nn.Module):
    """Pre-norm transformer block over caption tokens, without modulation."""

    def __init__(self, dim, head_dim, multiple_of, eps, bias, ops: OpSet | None = None):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, dim, head_dim, eps, bias, ops)
        self.norm2 = layer_norm(dim, eps)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, 4.0, multiple_of), bias, ops)

    def forward(self, y):
        y = y + self.attn(self.norm1(y))  # (B, L, D)
        return y + self.mlp(self.norm2(y))  # (B, L, D)


class WeightOnlyNorm(nn.Module):
    """`final_norm="none"` and `mixer_map_norm="none"`: the LayerNorm's learnable weight without
    its centring and division (same state-dict entry, so checkpoints of either kind load into the
    other)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.weight


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim, eps, norm: str = "layernorm"):
        super().__init__()
        # Registration order gives the published state-dict order.
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(gelu_tanh(), nn.Linear(dim, 2 * dim, bias=True))
        self.norm_final = layer_norm(dim, eps) if norm == "layernorm" else WeightOnlyNorm(dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)


class MicroDiT(nn.Module):
    """MicroDiT. `forward` returns the network output F (before EDM preconditioning).

    `ops` (microdit.ops.opset.OpSet) are the ops it runs, each with its backend; default: built
    from `config.backends` by `build_ops` (which checks them and the MICRODIT_BACKEND variable).
    """

    def __init__(self, config: MicroDiTConfig, ops: OpSet | None = None):
        super().__init__()
        self.config = cfg = config
        D, eps, bias = cfg.dim, cfg.norm_eps, cfg.use_bias
        self.ops = ops = ops if ops is not None else build_ops(cfg.backends)

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, D, eps)
        self.y_emb_preprocess = CaptionBlock(D, cfg.head_dim, cfg.multiple_of, eps, bias, ops)
        self.pooled_y_emb_process = ProjectionMLP(D, D, eps)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_tokens, D), persistent=True)
        self.register_buffer("mask_token", torch.zeros(1, 1, cfg.patch_dim), persistent=True)

        def ffn(dim, ratio, i, depth, backbone):
            if cfg.is_moe_block(i, depth, backbone):
                return ExpertChoiceMoE(dim, moe_hidden(dim, ratio, cfg.multiple_of), cfg.num_experts,
                                       cfg.expert_capacity, ops)
            return SwiGLU(dim, swiglu_hidden(dim, ratio, cfg.multiple_of), bias, ops)

        if cfg.use_patch_mixer:
            Dm, n = cfg.patch_mixer_dim, cfg.patch_mixer_depth
            # Registration order gives the published state-dict order (mixer blocks, then maps).
            self.patch_mixer = nn.ModuleList([
                Block(Dm, D, attention_width(Dm, cfg.patch_mixer_qkv_ratio, cfg.head_dim), cfg.head_dim,
                      ffn(Dm, cfg.patch_mixer_mlp_ratio, i, n, False), eps, bias, ops)
                for i in range(n)
            ])
            if Dm != D:
                norm = layer_norm if cfg.mixer_map_norm == "layernorm" else (lambda d, eps: WeightOnlyNorm(d))
                self.patch_mixer_map_xin = nn.Sequential(norm(D, eps), nn.Linear(D, Dm, bias=bias))
                self.patch_mixer_map_xout = nn.Sequential(norm(Dm, eps), nn.Linear(Dm, D, bias=bias))
                self.patch_mixer_map_y = nn.Sequential(layer_norm(D, eps), nn.Linear(D, Dm, bias=bias))
            else:
                self.patch_mixer_map_xin = self.patch_mixer_map_xout = self.patch_mixer_map_y = nn.Identity()
        self.blocks = nn.ModuleList([
            Block(D, D, attention_width(D, cfg.qkv_multipliers[i], cfg.head_dim), cfg.head_dim,
                  ffn(D, cfg.ffn_multipliers[i], i, cfg.depth, True), eps, bias, ops)
            for i in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(D, cfg.patch_dim, eps, cfg.final_norm)
        self.reset_pos_embed()

    # ------------------------------------------------------------------ init
    def reset_pos_embed(self) -> None:
        """Rebuild the fixed position table from the config (grid = base = input_size / p)."""
        cfg = self.config
        table = sincos_pos_table(cfg.dim, cfg.grid_size, cfg.grid_size, cfg.pos_interp_scale)
        self.pos_embed = torch.from_numpy(table).float().unsqueeze(0).to(self.pos_embed.device)

    def set_resolution(self, input_size: int, pos_interp_scale: float) -> "MicroDiT":
        """Move to a new latent grid (phase 3 of the recipe): only the position table changes."""
        self.config = self.config.replace(input_size=input_size, pos_interp_scale=pos_interp_scale)
        self.reset_pos_embed()
        return self

    @torch.no_grad()
    def initialize_weights(self) -> "MicroDiT":
        """Initialisation for training from scratch (spec 4b). All of it lives here; the
        published 0.02 is `config.init_std`."""
        cfg = self.config
        std = cfg.init_std
        if not std > 0:
            raise ValueError(f"init_std must be > 0, got {std!r}")

        def trunc(t, std):
            nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.y_embedder.y_proj.fc1,
                    self.y_embedder.y_proj.fc2, self.pooled_y_emb_process.fc1, self.pooled_y_emb_process.fc2):
            nn.init.normal_(lin.weight, std=std)

        def init_block(blk, out_std):
            for lin in (blk.attn.qkv, blk.cross_attn.q_linear, blk.cross_attn.kv_linear):
                trunc(lin.weight, std)
            trunc(blk.attn.proj.weight, out_std)
            trunc(blk.cross_attn.proj.weight, out_std)
            if isinstance(blk.mlp, ExpertChoiceMoE):
                trunc(blk.mlp.gate.weight, std)
                trunc(blk.mlp.w1, std)
                trunc(blk.mlp.w2, out_std)
            else:
                trunc(blk.mlp.w1.weight, std)
                trunc(blk.mlp.w2.weight, out_std)
                trunc(blk.mlp.w3.weight, out_std)
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)

        for i, blk in enumerate(self.blocks):
            init_block(blk, std / math.sqrt(2 * (i + 1)) if cfg.depth_init else std)
        for blk in getattr(self, "patch_mixer", []):
            init_block(blk, std / math.sqrt(2 * cfg.depth) if cfg.depth_init else std)
        nn.init.zeros_(self.y_emb_preprocess.attn.proj.weight)
        nn.init.zeros_(self.y_emb_preprocess.mlp.w3.weight)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.mask_token.zero_()
        self.reset_pos_embed()
        return self

    # ------------------------------------------------------------------ forward
    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, T, p*p*C) with per-token layout (row, col, channel) -> (B, C, h*p, w*p)."""
        return unpatchify(x, h, w, self.config.patch_size, self.config.in_channels)

    def embed_condition(self, c_noise: torch.Tensor, y: torch.Tensor):
        """Timestep + caption path: returns the refined caption (B, L, D) and `c` (B, D)."""
        if y.dim() == 4:
            y = y.squeeze(1)  # (B, L, Cy)
        if y.dim() != 3 or y.shape[-1] != self.config.caption_channels:
            raise ValueError(f"caption embeddings must be (B, 1, L, {self.config.caption_channels}) or "
                             f"(B, L, {self.config.caption_channels}); got {tuple(y.shape)}")
        t = self.t_embedder(c_noise.reshape(-1))  # (B or 1, D)
        y = self.y_emb_preprocess(self.y_embedder(y))  # (B, L, D)
        c = t + self.pooled_y_emb_process(y.mean(dim=1))  # (B, D)
        return y, c

    # Whether `forward` applies every block's adaLN and caption K/V maps itself, before the blocks
    # run (one multi_linear each). FSDP2 turns it off: it gathers a block's parameters only inside
    # that block's forward, so there each block applies its own (the same maps, one per block).
    across_blocks: bool = True

    def block_modulations(self, c: torch.Tensor, blocks) -> list[torch.Tensor | None]:
        """Every block's adaLN output (B, 6d) from GELU(c): one multi_linear (one GEMM when fused)."""
        if not self.across_blocks:
            return [None] * len(blocks)
        lins = [b.adaLN_modulation[1] for b in blocks]
        g = blocks[0].adaLN_modulation[0](c)  # (B, D): the same GELU-tanh(c) in every block
        return self.ops.multi_linear(g, [l.weight for l in lins], [l.bias for l in lins])

    def caption_kv(self, y: torch.Tensor, blocks) -> list[torch.Tensor | None]:
        """Every block's caption K/V (B, L, 2d) from the same caption states y: one multi_linear.
        None for each block (it projects its own) where its kv_linear is not a plain Linear (FP8)."""
        lins = [b.cross_attn.kv_linear for b in blocks]
        if not self.across_blocks or not all(type(l) is nn.Linear for l in lins):
            return [None] * len(lins)
        return self.ops.multi_linear(y, [l.weight for l in lins], [l.bias for l in lins])

    def run_blocks(self, blocks, x, y, c, mods, kvs):
        """The blocks in order. Where the model applies the maps across blocks, each block's last
        gated residual is added by the next block, fused with its norm1 + modulate (the chain
        ends at the last block). Under FSDP2 (across_blocks off) each block keeps its own."""
        pending = None
        for i, (block, mod, kv) in enumerate(zip(blocks, mods, kvs)):
            defer = self.across_blocks and i < len(blocks) - 1
            out = block(x, y, c, mod, kv, pending=pending, defer=defer)
            x, pending = (out[0], out[1:]) if defer else (out, None)  # (B, N, d)
        return x

    def forward(self, x, c_noise, y, *, mask_ratio: float = 0.0, ids_keep=None, guidance: float = 1.0,
                generator: torch.Generator | None = None):
        """F(x, c_noise, y): (B, C, H, W) -> (B, C, H, W). `ids_keep` (B, K) fixes the kept tokens."""
        if guidance != 1.0:
            return self.forward_with_cfg(x, c_noise, y, guidance, mask_ratio=mask_ratio, ids_keep=ids_keep,
                                         generator=generator)
        cfg = self.config
        B, C, H, W = x.shape
        p = cfg.patch_size
        if C != cfg.in_channels or H % p or W % p:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, H, W) with H, W multiples of {p}; "
                             f"got {tuple(x.shape)}")
        h, w = H // p, W // p
        if h * w != self.pos_embed.shape[1]:
            raise ValueError(f"latents of {H}x{W} give {h * w} tokens but the position table has "
                             f"{self.pos_embed.shape[1]} (call reset_pos_embed(grid) for a new resolution)")
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, D)
        y, c = self.embed_condition(c_noise, y)  # (B, L, D), (B, D)

        mixer = list(self.patch_mixer) if cfg.use_patch_mixer else []
        mods = self.block_modulations(c, mixer + list(self.blocks))  # (B, 6d) per block
        if cfg.use_patch_mixer:
            x = self.patch_mixer_map_xin(x)  # (B, T, Dm)
            y_mixer = self.patch_mixer_map_y(y)  # (B, L, Dm)
            x = self.run_blocks(mixer, x, y_mixer, c, mods[:len(mixer)], self.caption_kv(y_mixer, mixer))  # (B, T, Dm)
        T = x.shape[1]
        if ids_keep is None and mask_ratio > 0:
            ids_keep = self.ops.keep_indices(B, T, mask_ratio, x.device, generator)
        if ids_keep is not None:
            if ids_keep.dim() != 2 or ids_keep.shape[0] != B or ids_keep.shape[1] > T:
                raise ValueError(f"ids_keep must be (B={B}, K<={T}); got {tuple(ids_keep.shape)}")
            x = self.ops.mask_tokens(x, ids_keep)  # (B, K, Dm)
        if cfg.use_patch_mixer:
            x = self.patch_mixer_map_xout(x)  # (B, K, D)
        x = self.run_blocks(list(self.blocks), x, y, c, mods[len(mixer):], self.caption_kv(y, self.blocks))  # (B, K, D)
        x = self.final_layer(x, c)  # (B, K, p*p*C)
        if ids_keep is not None:
            # Un-mask with mask_token and un-patchify, in one pass where a backend fuses them.
            return self.ops.unmask_unpatchify(x, ids_keep, T, self.mask_token, h, w, p, cfg.in_channels)  # (B, C, H, W)
        return self.unpatchify(x, h, w)  # (B, C, H, W)

    def forward_with_cfg(self, x, c_noise, y, guidance: float, **kw):
        """Classifier-free guidance: conditional and zero-caption passes in one batch."""
        x2 = torch.cat([x, x])
        t2 = c_noise.reshape(-1).expand(x.shape[0]) if c_noise.numel() == 1 else c_noise.reshape(-1)
        y2 = torch.cat([y, torch.zeros_like(y)])
        ids = kw.pop("ids_keep", None)
        out = self.forward(x2, torch.cat([t2, t2]), y2, ids_keep=None if ids is None else torch.cat([ids, ids]), **kw)
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory, *, encoders: dict | None = None):
        """Write config.json + model.safetensors (the Hugging Face layout, see models/pretrained.py)."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, encoders=encoders)

    @classmethod
    def from_pretrained(cls, source, *, backends: dict | None = None) -> "MicroDiT":
        """A MicroDiT from a save_pretrained folder or a hub id holding one."""
        from .pretrained import from_pretrained

        return from_pretrained(source, backends=backends)
