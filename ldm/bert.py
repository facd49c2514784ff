"""LDM-1.4B's BERT-like text tower (Rombach et al. 2022): an x-transformers pre-norm encoder, original key names.

Keys are `cond_stage_model.transformer.*` of txt2img-f8-large minus the prefix: `token_emb`, `pos_emb.emb`,
`attn_layers.layers.{2i}.{0: LayerNorm, 1: Attention}`, `attn_layers.layers.{2i+1}.{0: LayerNorm, 1: FeedForward}`,
`norm`. The checkpoint's `to_logits` (the unused language-model head, 1280×30522) is not held: a load_state_dict
pre-hook drops `to_logits.*`, so a strict load of the original keys works without allocating it.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.attention import attention

__all__ = ["LDMBertTextModel", "UNUSED_KEYS"]

FF_MULT = 4  # x-transformers FeedForward default: inner = 4 × width
UNUSED_KEYS = ("to_logits.weight", "to_logits.bias")


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positions (x-transformers), key `pos_emb.emb`."""

    def __init__(self, width: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, width)


class Attention(nn.Module):
    """Non-causal multi-head self-attention: to_q/to_k/to_v without bias, to_out with bias (x-transformers)."""

    def __init__(self, width: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(width, inner, bias=False)
        self.to_v = nn.Linear(width, inner, bias=False)
        self.to_out = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # (B, N, H·D) -> (B, H, N, D)
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (B, H, N, D) -> (B, N, H·D)


class FeedForward(nn.Module):
    """net.0 = (Linear → exact GELU), net.1 = dropout (identity at inference), net.2 = Linear."""

    def __init__(self, width: int, mult: int = FF_MULT) -> None:
        super().__init__()
        inner = width * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(width, inner), nn.GELU()), nn.Identity(), nn.Linear(inner, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionLayers(nn.Module):
    """x-transformers Encoder: layers alternate (norm, attention) and (norm, feed-forward), pre-norm residuals."""

    def __init__(self, width: int, depth: int, heads: int, dim_head: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(nn.ModuleList([nn.LayerNorm(width), Attention(width, heads, dim_head)]))
            blocks.append(nn.ModuleList([nn.LayerNorm(width), FeedForward(width)]))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


def _drop_unused(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the checkpoint's language-model head is tolerated and ignored."""
    for key in UNUSED_KEYS:
        state_dict.pop(prefix + key, None)


class LDMBertTextModel(nn.Module):
    """Token ids (B, N) or token embeddings (B, N, width) → final-norm hidden states (B, N, width), the context."""

    def __init__(
        self,
        vocab_size: int = 30522,
        width: int = 1280,
        layers: int = 32,
        heads: int = 8,
        dim_head: int = 64,
        max_seq_len: int = 77,
    ) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = AbsolutePositionalEmbedding(width, max_seq_len)
        self.attn_layers = AttentionLayers(width, layers, heads, dim_head)
        self.norm = nn.LayerNorm(width)
        self.register_load_state_dict_pre_hook(_drop_unused)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The frozen vocabulary table (the textual-inversion hook reads rows of it)."""
        return self.token_emb

    @property
    def width(self) -> int:
        return self.token_emb.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.token_emb.num_embeddings

    @property
    def context_length(self) -> int:
        return self.pos_emb.emb.num_embeddings

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids through the table (or precomputed token embeddings as given) plus absolute positions."""
        if tokens.is_floating_point():
            if tokens.dim() != 3 or tokens.shape[-1] != self.width:
                raise ValueError(f"token embeddings must be (B, N, {self.width}); got {tuple(tokens.shape)}")
            x = tokens
        else:
            if tokens.dim() != 2:
                raise ValueError(f"token ids must be (B, N); got {tuple(tokens.shape)}")
            x = self.token_emb(tokens)
        n = x.shape[1]
        if n > self.context_length:
            raise ValueError(f"{n} tokens exceed the context length {self.context_length}")
        positions = torch.arange(n, device=x.device)
        return x + self.pos_emb.emb(positions).to(x.dtype)[None]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.attn_layers(self.embed(tokens)))
