"""The VLA policy: pixels + instruction + proprioception in, discretised action tokens out.

Vision: a small CNN on RGB plus two coordinate channels, modulated (FiLM) by the pooled
instruction embedding so the language selects what the filters attend to; its last feature map
gives spatial-softmax keypoints (expected x, y per channel: positions are what manipulation
needs) and, for the larger sizes, pooled patch tokens. Language: word embeddings + a small
transformer, pooled. Fusion: a transformer trunk over [instruction token, vision token,
proprio token, (patch tokens), one query per action dimension]; each query's output is a
distribution over ``bins`` action tokens. An optional auxiliary head predicts object positions
from the vision features; it supervises the encoder during cloning and is not used to act.
The action dimensions are independent given the observation, so the log-probability of an
action is the sum of its tokens' log-probabilities.

``size`` scales widths and depths from ``tiny`` (~1 M parameters, the CPU default) to ``large``
(~1 B, for forward/backward and weight-distribution benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dvla_bus.errors import ConfigError

KP_TEMP_INIT = 10.0


@dataclass(frozen=True, slots=True)
class SizeSpec:
    channels: tuple[int, int, int]
    d_model: int
    layers: int
    heads: int
    lang_layers: int
    patch_grid: int  # the last feature map pooled to grid x grid patch tokens (0: none)


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec((16, 32, 32), 96, 2, 4, 1, 0),
    "small": SizeSpec((32, 64, 64), 256, 4, 4, 1, 2),
    "base": SizeSpec((32, 64, 128), 768, 12, 12, 2, 4),
    "large": SizeSpec((64, 128, 256), 2048, 20, 16, 1, 4),
}


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    size: str = "tiny"
    image_size: int = 64
    proprio_dim: int = 7
    action_dim: int = 4
    bins: int = 256
    vocab_size: int = 64
    max_tokens: int = 16
    aux_dim: int = 10  # auxiliary head: object positions predicted from vision (0: none)
    stem: str = "conv"  # "conv" (5x5/2 then 3x3/2) or "patch" (4x4/4 then 3x3/1)

    def spec(self) -> SizeSpec:
        try:
            return SIZES[self.size]
        except KeyError:
            raise ConfigError(
                f"policy size {self.size!r}: choose one of {', '.join(SIZES)}"
            ) from None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm transformer block (attention + GELU MLP)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class VLAPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.spec()
        d = s.d_model
        c1, c2, c3 = s.channels
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.tok_pos = nn.Parameter(torch.randn(cfg.max_tokens, d) * 0.02)
        self.lang = nn.ModuleList(Block(d, s.heads) for _ in range(s.lang_layers))
        self.lang_norm = nn.LayerNorm(d)
        if cfg.stem == "patch":  # 4x4 patches straight to 1/4 resolution: cheapest on CPU
            self.conv1 = nn.Conv2d(5, c1, 4, stride=4)
            self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        elif cfg.stem == "conv":
            self.conv1 = nn.Conv2d(5, c1, 5, stride=2, padding=2)
            self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        else:
            raise ConfigError(f"policy stem {cfg.stem!r}: choose 'patch' or 'conv'")
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.film = nn.Linear(d, 2 * (c2 + c3))
        self.kp_temp = nn.Parameter(torch.zeros(()))
        self.grid = s.patch_grid
        if self.grid:
            self.patch = nn.Linear(c3, d)
            self.patch_pos = nn.Parameter(torch.randn(self.grid * self.grid, d) * 0.02)
        self.vis = nn.Linear(3 * c3, d)
        self.prop = nn.Linear(cfg.proprio_dim, d)
        self.type_emb = nn.Parameter(torch.randn(3, d) * 0.02)  # language, vision, proprio
        self.queries = nn.Parameter(torch.randn(cfg.action_dim, d) * 0.02)
        self.trunk = nn.ModuleList(Block(d, s.heads) for _ in range(s.layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.bins)
        if cfg.aux_dim:
            self.aux = nn.Linear(3 * c3, cfg.aux_dim)
        self._split = (c2, c3)
        n = cfg.image_size
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_instruction(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled instruction embeddings (B, d) for token ids (B, L); each distinct instruction
        of the batch is encoded once (a batch holds few distinct instructions)."""
        uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        pad = uniq == 0
        lang = self.tok_emb(uniq) + self.tok_pos[: uniq.shape[1]]
        mask = (~pad)[:, None, None, :]  # True = attend; padding keys are masked out
        for blk in self.lang:
            lang = blk(lang, mask)
        keep = (~pad).unsqueeze(-1).to(lang.dtype)
        pooled: torch.Tensor = self.lang_norm((lang * keep).sum(1) / keep.sum(1).clamp(min=1.0))
        return pooled[inverse]

    def encode_image(
        self, images: torch.Tensor, lang: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision features (B, 3 * C: keypoint x, y and mean activation per channel) and the
        last feature map (B, C, h, w), the filters modulated (FiLM) by the instruction."""
        b = images.shape[0]
        gb = self.film(lang).split([2 * c for c in self._split], dim=-1)
        x = images.permute(0, 3, 1, 2).to(lang.dtype) * (1.0 / 255.0) - 0.5
        coords: torch.Tensor = self.coords  # type: ignore[assignment]
        x = torch.cat([x, coords.expand(b, -1, -1, -1).to(x.dtype)], dim=1)
        x = F.relu(self.conv1(x))
        for conv, film in zip((self.conv2, self.conv3), gb, strict=True):
            gamma, beta = film.chunk(2, dim=-1)
            x = F.relu(conv(x) * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None])
        h, w = x.shape[-2:]
        flat = x.flatten(2)
        att = torch.softmax(flat * torch.exp(self.kp_temp), dim=-1)  # (B, C, h*w)
        gy, gx = torch.meshgrid(
            torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
            torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype),
            indexing="ij",
        )
        kx = (att * gx.reshape(1, 1, -1)).sum(-1)
        ky = (att * gy.reshape(1, 1, -1)).sum(-1)
        return torch.cat([kx, ky, flat.mean(-1)], dim=-1), x

    def forward_with_aux(
        self, images: torch.Tensor, proprio: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Action logits (B, action_dim, bins) and the auxiliary prediction (B, aux_dim) or
        None, for images uint8 (B, H, W, 3), proprio float (B, P), token ids int64 (B, L)."""
        b = images.shape[0]
        lang = self.encode_instruction(tokens)
        feats, fmap = self.encode_image(images, lang)
        parts = [
            (lang + self.type_emb[0])[:, None],
            (self.vis(feats) + self.type_emb[1])[:, None],
            (self.prop(proprio.to(lang.dtype)) + self.type_emb[2])[:, None],
        ]
        if self.grid:
            patches = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)
            parts.append(self.patch(patches) + self.patch_pos)
        parts.append(self.queries.expand(b, -1, -1))
        seq = torch.cat(parts, dim=1)
        for blk in self.trunk:
            seq = blk(seq, None)
        logits: torch.Tensor = self.head(self.norm(seq[:, -self.cfg.action_dim :]))
        aux = self.aux(feats) if self.cfg.aux_dim else None
        return logits, aux

    def forward(
        self, images: torch.Tensor, proprio: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, action_dim, bins); see :meth:`forward_with_aux`."""
        return self.forward_with_aux(images, proprio, tokens)[0]


def init_weights(model: VLAPolicy, seed: int) -> None:
    """Deterministic re-initialisation of every parameter from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.startswith("film.") or name.endswith("bias"):
                p.zero_()
            elif name == "kp_temp":
                # a sharp spatial softmax from the start: with a flat one the keypoints sit at
                # the image centre and small objects get almost no gradient
                p.fill_(math.log(KP_TEMP_INIT))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() >= 2 and "pos" not in name and name != "queries":
                fan_in = math.prod(p.shape[1:])
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    with torch.no_grad():
        model.head.weight.mul_(0.1)
