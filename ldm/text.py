"""CLIP text towers (Radford et al. 2021) as Stable Diffusion consumes them: HF layout (SD1), OpenCLIP (SD2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import attention

__all__ = ["CLIPTextModel", "OpenCLIPTextModel", "quick_gelu"]

LAYER_NORM_EPS = 1e-5
QUICK_GELU_ALPHA = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's QuickGELU, x·σ(1.702x) (Hendrycks & Gimpel 2016, sigmoid approximation)."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, N, C) -> (B, H, N, C/H)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, H, N, D) -> (B, N, H·D)


def _embed(tokens: torch.Tensor, table: nn.Embedding, positions: torch.Tensor, width: int) -> torch.Tensor:
    """Token ids (B, N) through the table, or precomputed embeddings (B, N, width) as given, plus positions."""
    if tokens.is_floating_point():
        if tokens.dim() != 3 or tokens.shape[-1] != width:
            raise ValueError(f"token embeddings must be (B, N, {width}); got {tuple(tokens.shape)}")
        x = tokens
    else:
        if tokens.dim() != 2:
            raise ValueError(f"token ids must be (B, N); got {tuple(tokens.shape)}")
        x = table(tokens)
    n = x.shape[1]
    if n > positions.shape[0]:
        raise ValueError(f"{n} tokens exceed the context length {positions.shape[0]}")
    return x + positions[:n].to(x.dtype)


# --- SD1: transformers' CLIPTextModel layout -------------------------------------------------------------


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections (HF CLIP layout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(_merge_heads(attention(q, k, v, causal=True)))


class CLIPMLP(nn.Module):
    """fc1 → QuickGELU → fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(width, 4 * width)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads) for _ in range(layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, context_length: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context_length, width)


class CLIPTextTransformer(nn.Module):
    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context_length: int) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, context_length)
        self.encoder = CLIPEncoder(width, layers, heads)
        self.final_layer_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)


class CLIPTextModel(nn.Module):
    """SD1's text encoder, CLIP ViT-L/14 text tower; output = final_layer_norm(last layer), (B, 77, width)."""

    def __init__(
        self, vocab_size: int = 49408, width: int = 768, layers: int = 12, heads: int = 12, context_length: int = 77
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.vocab_size, self.width, self.context_length = vocab_size, width, context_length
        self.layers, self.heads = layers, heads
        self.text_model = CLIPTextTransformer(vocab_size, width, layers, heads, context_length)
        self._init_weights()

    def _init_weights(self) -> None:
        """CLIP's initialisation (std 0.02 tables, width-scaled projections); a no-op on the meta device."""
        emb = self.text_model.embeddings
        nn.init.normal_(emb.token_embedding.weight, std=0.02)
        nn.init.normal_(emb.position_embedding.weight, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        for layer in self.text_model.encoder.layers:
            for lin, std in (
                (layer.self_attn.q_proj, attn_std),
                (layer.self_attn.k_proj, attn_std),
                (layer.self_attn.v_proj, attn_std),
                (layer.self_attn.out_proj, proj_std),
                (layer.mlp.fc1, (2 * self.width) ** -0.5),
                (layer.mlp.fc2, proj_std),
            ):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids (B, N) or token embeddings (B, N, width) → context (B, N, width)."""
        tm = self.text_model
        x = _embed(tokens, tm.embeddings.token_embedding, tm.embeddings.position_embedding.weight, self.width)
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)


# --- SD2: OpenCLIP layout --------------------------------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """Causal self-attention with packed in_proj (q, k, v rows), as torch.nn.MultiheadAttention stores it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            _split_heads(t, self.heads) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        )
        return self.out_proj(_merge_heads(attention(q, k, v, causal=True)))


class OpenCLIPMLP(nn.Module):
    """c_fc → exact GELU → c_proj."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = OpenCLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = OpenCLIPMLP(width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


class OpenCLIPTextModel(nn.Module):
    """SD2's text encoder, OpenCLIP ViT-H/14 text tower; "penultimate" = ln_final(block layers-2 output)."""

    OUTPUTS = ("penultimate", "last")

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        context_length: int = 77,
        output: str = "penultimate",
    ) -> None:
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output={output!r}; choose one of {', '.join(self.OUTPUTS)}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if output == "penultimate" and layers < 2:
            raise ValueError("output='penultimate' needs at least 2 layers")
        self.vocab_size, self.width, self.context_length = vocab_size, width, context_length
        self.layers, self.heads, self.output = layers, heads, output
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = OpenCLIPTransformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.text_projection = nn.Parameter(torch.empty(width, width))
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenCLIP's initialisation; a no-op on the meta device."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=attn_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids (B, N) or token embeddings (B, N, width) → context (B, N, width)."""
        x = _embed(tokens, self.token_embedding, self.positional_embedding, self.width)
        blocks = self.transformer.resblocks
        n_run = len(blocks) - 1 if self.output == "penultimate" else len(blocks)
        for block in blocks[:n_run]:
            x = block(x)
        return self.ln_final(x)
