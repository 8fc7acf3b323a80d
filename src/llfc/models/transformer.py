"""Pre-LayerNorm transformers in plain PyTorch (nanoGPT style): ``vit`` and ``gpt``.

Both are traceable by torch.fx (attention is four ``nn.Linear`` and one
``F.scaled_dot_product_attention``), so llfc's probes, conditions and permutation machinery see
every layer. Module names (stable: the permutation spec and the checkpoints rely on them):

=====================  =================================================================
name                   module / parameter
=====================  =================================================================
blocks.{i}.ln1         LayerNorm(d) before attention
blocks.{i}.attn.q/k/v  Linear(d, d): queries, keys, values (heads = contiguous d_h slices)
blocks.{i}.attn.o      Linear(d, d): output projection (writes to the residual stream)
blocks.{i}.ln2         LayerNorm(d) before the MLP
blocks.{i}.mlp.fc1     Linear(d, r·d) (MLP pre-activation)
blocks.{i}.mlp.act     GELU() (MLP post-activation)
blocks.{i}.mlp.fc2     Linear(r·d, d) (writes to the residual stream)
ln_f                   final LayerNorm(d)
head                   Linear(d, classes) (ViT) / Linear(d, V, bias=False) (GPT, unembedding)
ViT: patch_embed       Conv2d(C, d, patch, stride=patch)
ViT: cls_token         Parameter (1, 1, d) (present only with pooling "cls")
ViT: pos_embed         Parameter (1, N(+1), d), N = (H/patch)·(W/patch) patches
GPT: tok_emb           Embedding(V, d)
GPT: pos_emb           Embedding(block_size, d)
=====================  =================================================================

Sources: ViT (Dosovitskiy et al., ICLR 2021, Eq. 1–4, pre-LN blocks); GPT-2 layout as in
Karpathy's nanoGPT (pre-LN, GELU MLP with ratio 4, learned position embedding, optional weight
tying of the unembedding to the token embedding, Press & Wolf 2017).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llfc.errors import ConfigError
from llfc.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v, o projections.

    Args:
        d: model width (residual stream dimension); must be divisible by ``n_heads``.
        n_heads: number of heads H; head dimension d_h = d / H. Head h uses rows
            ``h·d_h:(h+1)·d_h`` of q, k, v and the same columns of o.
        causal: mask attention to future positions (decoder).
        bias: biases on q, k, v, o.

    Shapes: input (B, T, d) float; output (B, T, d).
    Computes softmax(Q Kᵀ/√d_h [+ causal mask]) V per head (Vaswani et al. 2017, Eq. 1) with
    ``F.scaled_dot_product_attention``.
    """

    def __init__(self, d: int, n_heads: int, causal: bool = False, bias: bool = True):
        super().__init__()
        if d % n_heads != 0:
            raise ConfigError(
                f"width {d} is not divisible by heads={n_heads}; choose a width "
                f"that is a multiple of the number of heads."
            )
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        self.causal = causal
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, dh = self.n_heads, self.head_dim
        q = self.q(x).view(B, T, H, dh).transpose(1, 2)
        k = self.k(x).view(B, T, H, dh).transpose(1, 2)
        v = self.v(x).view(B, T, H, dh).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.o(y)


class MLP(nn.Module):
    """fc1 (d → ratio·d) → GELU → fc2 (ratio·d → d). Shapes: (B, T, d) → (B, T, d)."""

    def __init__(self, d: int, ratio: int = 4, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d, ratio * d, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). Shapes: (B, T, d)."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int = 4, causal: bool = False, bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads, causal=causal, bias=bias)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


def _init_weights(model: nn.Module) -> None:
    """GPT-2/nanoGPT initialisation: Linear and Embedding weights N(0, 0.02), biases 0; LayerNorm
    weight 1, bias 0; class token and position embedding N(0, 0.02)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)


class ViT(nn.Module):
    """Vision transformer (Dosovitskiy et al. 2021) with pre-LN blocks.

    Args:
        in_channels, image_size: input C and (H, W); H and W must be multiples of ``patch``.
        num_classes: number of logits.
        width: d. depth: number of blocks. heads: attention heads. mlp_ratio: MLP hidden = r·d.
        patch: patch size (square, non-overlapping).
        pool: "cls" (class token, the ViT paper) or "mean" (mean over patch tokens).
        bias: biases in q, k, v, o and the MLP.

    Shapes: input (B, C, H, W) float32; output (B, num_classes) logits.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        patch: int = 7,
        pool: str = "cls",
        bias: bool = True,
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"vit pool must be 'cls' or 'mean', got {pool!r}.")
        h, w = image_size
        if h % patch or w % patch:
            raise ConfigError(
                f"vit: image size {h}×{w} is not a multiple of patch={patch}; "
                f"choose a patch size that divides both (e.g. 7 for 28×28, 4 for 32×32)."
            )
        self.pool = pool
        n = (h // patch) * (w // patch)
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, n + (pool == "cls"), width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal=False, bias=bias) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, d)
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(x)


class GPT(nn.Module):
    """Character-level causal decoder (GPT-2 layout as in nanoGPT) with pre-LN blocks.

    Args:
        vocab_size: V (number of characters).
        block_size: length of the position table (the longest context the model accepts).
        width, depth, heads, mlp_ratio, bias: as for :class:`ViT`.
        tie_weights: share the unembedding ``head.weight`` with ``tok_emb.weight``.

    Shapes: input (B, T) int64 token ids with T ≤ block_size; output (B, T, V) next-token logits.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        bias: bool = True,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal=True, bias=bias) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        _init_weights(self)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        torch._assert(
            T <= self.block_size,
            "context longer than the GPT's position table "
            "(block_size); use a shorter context or build the model with a larger block_size",
        )
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


@register_model("vit")
def vit(
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    width: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: int = 4,
    patch: int | None = None,
    pool: str = "cls",
    bias: bool = True,
) -> ViT:
    """Vision transformer; CPU size by default (width 64, 4 blocks, 4 heads, MLP ratio 4).

    ``patch`` defaults to 7 for 28×28 inputs (16 patches) and 4 otherwise (64 patches on
    32×32). GLMC's paper-scale CIFAR-10 model: width 256, depth 6, heads 8 (configs/paper).

    Raises:
        ConfigError: ``input_shape`` is not an image shape (C, H, W), e.g. a text dataset's (T,).
    """
    if len(input_shape) != 3:
        raise ConfigError(
            f"vit reads images (channels, height, width), but the input shape is {tuple(input_shape)} "
            f"(a text dataset's windows of token ids?). For text use --model gpt; for vit an image "
            f"dataset (digits, mnist, fashion-mnist, cifar10)."
        )
    c, h, w = (int(s) for s in input_shape)
    if patch is None:
        patch = 7 if (h % 7 == 0 and w % 7 == 0) else 4
    return ViT(
        c, (h, w), int(num_classes), int(width), int(depth), int(heads), int(mlp_ratio), int(patch), pool, bool(bias)
    )


@register_model("gpt")
def gpt(
    input_shape: Sequence[int] = (128,),
    num_classes: int = 65,
    width: int = 128,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 4,
    block_size: int | None = None,
    bias: bool = True,
    tie_weights: bool = False,
) -> GPT:
    """Character-level GPT; ``input_shape`` = (context length T,), ``num_classes`` = vocabulary
    size V (a text dataset's :class:`~llfc.data.DatasetInfo` passes both). ``block_size``
    (position table length) defaults to T.

    Raises:
        ConfigError: ``block_size`` shorter than the context length T, or an image ``input_shape``.
    """
    if len(input_shape) != 1:
        raise ConfigError(
            f"gpt reads windows of token ids (T,), but the input shape is {tuple(input_shape)} (an image "
            f"dataset?). Use a text dataset (--dataset tinyshakespeare) for gpt, or --model vit for images."
        )
    t = int(input_shape[-1])
    block_size = t if block_size is None else int(block_size)
    if t > block_size:
        raise ConfigError(
            f"gpt: the context length {t} is longer than the model's position table "
            f"(block_size={block_size}); use a shorter context (llfc run --dataset-args "
            f"'{{\"context\": {block_size}}}', or dataset_args: {{context: {block_size}}} in a config) or a larger "
            f"block_size (--model-args '{{\"block_size\": {t}}}'; model_args in a config or create_model)."
        )
    return GPT(
        int(num_classes), block_size, int(width), int(depth), int(heads), int(mlp_ratio), bool(bias), bool(tie_weights)
    )
