"""
Train GPT-2 (124M) from scratch, fine-tune it, sample from it, export it to Hugging Face. Importing it runs nothing.

    python train_gpt2.py --recipe shakespeare                   # a small GPT on Tiny Shakespeare, CPU, minutes
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # the GPT-2 (124M) reproduction, 8 GPUs
    python train_gpt2.py --init_from gpt2 --sample "Hello, I'm a language model,"

The seed's story (build-nanogpt's), read top to bottom, each section using only what comes before it: the model
(GPTConfig, the blocks of GPT-2 and of the modern arch, the KV cache), the loss (cross-entropy over the lm_head in
chunks), GPT (init, forward, generate, Hugging Face import and export), the data (DataLoaderLite, ValSet), the LR
schedule and the optimizers (AdamW, Muon), checkpoints, the run and its training step, evaluation, the DDP loop and
the command line. What runs around a run lives in sibling modules, called by name: common (errors, rank-0 print,
device and precision, launch and collectives, stop signals), sharding (FSDP, --batch_size auto, the loss path),
checkpoints (the files), checks (flags and input files), metrics (progress, run.json, TensorBoard, wandb) and
huggingface (GPT-2 and NanoChat weights both ways).
"""

import argparse
import functools
import glob
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import checks
import common
import hellaswag
import huggingface
import metrics
import sharding
from common import GPT2_EOT, GPT2_VOCAB, CheckpointWriteFailed, TrainingDiverged, UsageError


# -----------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # 50000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    arch: str = "gpt2"  # gpt2, or modern: see "The modern block" below; checkpoints without it are gpt2


ARCHS = ("gpt2", "modern")


# sizes of OpenAI's released checkpoints (all with block_size 1024 and vocab 50257)
MODEL_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def model_config(name, vocab_size=50304, block_size=1024, arch="gpt2"):
    """--model: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or dN = N layers of width 64*N with N heads (d12 = gpt2).
    arch (--arch): gpt2, or modern (the same sizes with the modern block)."""
    if name in MODEL_SIZES:
        sizes = MODEL_SIZES[name]
    elif re.fullmatch(r"d[1-9][0-9]*", name):
        n = int(name[1:])
        sizes = dict(n_layer=n, n_head=n, n_embd=64 * n)
    else:
        raise ValueError(f"unknown --model {name!r}: use one of {', '.join(MODEL_SIZES)} or dN (N layers, width 64*N, "
                         "e.g. d6)")
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, arch=arch, **sizes)


# ---- the modern block (--arch modern): GPT-2 with the changes that sped up speedruns since (modded-nanogpt): rotary
# position embeddings instead of the learned wpe, RMSNorm without a gain (also on the embedding output, and on q and k
# per head: QK-norm), ReLU^2 instead of GELU, no biases, zero-init output projections and an untied zero-init lm_head,
# logits soft-capped with tanh. Block matrices stay under transformer.h and norms have no parameters: Muon's groups.


ROTARY_BASE = 10000
LOGIT_SOFTCAP = 15.0  # logits = cap * tanh(logits / cap): bounded, so no token's logit runs away


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def make_norm(config):
    if config.arch == "gpt2":
        return nn.LayerNorm(config.n_embd)
    return nn.RMSNorm(config.n_embd, elementwise_affine=False)  # no learned gain: the next matmul can scale as it likes


def rotary_tables(head_size, block_size):
    """cos and sin (block_size, head_size / 2) of the angles position * ROTARY_BASE^(-2i / head_size)."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate the pairs (x[..., i], x[..., i + d/2]) of x (B, n_head, T, d) by the angles of their positions:
    q.k then depends only on how far apart two positions are."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def softcap(logits, cap):
    return cap * torch.tanh(logits.float() / cap)


def decoding_mask(T, length, device):
    """Which of the `length` cached positions each of the T newest queries sees; None for one query, which sees
    them all: a mask keeps SDPA off its flash and memory-efficient kernels on GPUs."""
    if T == 1:
        return None
    return torch.ones(T, length, dtype=torch.bool, device=device).tril(diagonal=length - T)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        bias = config.arch == "gpt2"  # the modern block has no biases
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init, see GPT._init_weights

    def forward(self, x, kv_cache=None, rotary=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:  # modern: QK-norm, then rotate q and k by their positions (keys are cached rotated)
            q, k = (apply_rotary(rms_norm(t), *rotary).type_as(v) for t in (q, k))
        if kv_cache is None:
            # flash attention where the device has it; is_causal builds no (T, T) mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = kv_cache.update(k, v)
            if T == k.size(2):  # prefill: nothing cached before this chunk
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # decoding: the new queries see every cached position and the causal part of their own
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=decoding_mask(T, k.size(2), x.device))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class KVCache:
    """Keys and values of one layer, preallocated for block_size positions, so a new token costs one position."""

    def __init__(self, B, n_head, head_size, block_size, dtype, device):
        self.k = torch.empty(B, n_head, block_size, head_size, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def update(self, k, v):
        T = k.size(2)
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = config.arch == "gpt2"
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=bias)
        self.c_proj.RESIDUAL_PROJ = True
        self.gelu = bias

    def forward(self, x):
        h = self.c_fc(x)
        # GPT-2: the tanh approximation of GELU OpenAI trained with; modern: ReLU^2
        h = F.gelu(h, approximate="tanh") if self.gelu else F.relu(h).square()
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rotary=None):
        # pre-LayerNorm: the residual stream itself is never normalized, so gradients flow straight to the input
        x = x + self.attn(self.ln_1(x), kv_cache, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# The loss: mean cross-entropy of the lm_head's logits, computed in chunks of rows


def chunk_loss_and_grad(xc, weight, tc, cap, row_scale=None):
    """(summed cross-entropy of the chunk's rows whose target is not -1, its gradient with respect to the logits
    xc @ weight.T times row_scale per row, in xc's dtype; None without row_scale). cap: the logits are
    cap * tanh(logits / cap) (the modern arch's soft-cap); None: not capped.
    Elementwise passes over the float32 logits are a large share of a CPU step, so they are few: a max, a fused softmax
    (at the max it is 1 / sum(exp(logits - max)): logsumexp without exp's second pass), the gradient made from it
    in place and scaled in float32 before the cast (fp16 cannot hold it unscaled, see LinearCrossEntropyScaled)."""
    logits = (xc @ weight.t()).float()
    if cap is not None:
        # cap * tanh(u / cap) = 2 cap sigmoid(2u / cap) - cap (sigmoid: ~3x faster than tanh on an AVX2 CPU); the
        # softmax and the loss do not see the shift by cap; the cap's derivative is 1 - tanh^2 = 4 s (1 - s)
        s = logits.mul_(2 / cap).sigmoid_()
        logits = s * (2 * cap)
    safe_t = tc.clamp(min=0)[:, None]
    target_logit = logits.gather(1, safe_t).squeeze(1)
    top = logits.amax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    del logits
    lse = top - probs.amax(dim=-1).log()
    loss = ((lse - target_logit) * (tc != -1)).sum()
    if row_scale is None:
        return loss, None
    grad = probs.scatter_add_(1, safe_t, torch.full_like(lse[:, None], -1.0))
    if cap is not None:
        grad.mul_(s.addcmul_(s, s, value=-1))
        row_scale = row_scale * 4
    return loss, grad.mul_(row_scale[:, None]).to(xc.dtype)


def chunked_loss(x, weight, targets, chunk_size, cap, grad_scale=None):
    """(summed loss, grad_x, grad_w) of the rows whose target is not -1, chunk by chunk; with grad_scale, the
    gradients of grad_scale * the summed loss (else None), each chunk's turned into them right away."""
    valid = targets != -1
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = grad_w = None
    if grad_scale is not None:
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight, dtype=torch.float32)
    for i in range(0, x.size(0), chunk_size):
        rows = slice(i, i + chunk_size)
        row_scale = None if grad_scale is None else valid[rows] * grad_scale
        chunk_loss, grad = chunk_loss_and_grad(x[rows], weight, targets[rows], cap, row_scale)
        loss += chunk_loss
        if grad is not None:
            grad_x[rows] = grad @ weight
            grad_w += (grad.t() @ x[rows]).float()
    return loss, grad_x, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (x @ weight.T) against targets, without keeping the (N, vocab) logits: memory holds
    one chunk of logits instead of all of them (13 GB in float32 for B=64, T=1024, vocab 50304), and the
    gradients, made in forward, are not recomputed in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, cap=None):
        n_valid = (targets != -1).sum().clamp(min=1)
        loss, grad_x, grad_w = chunked_loss(x, weight, targets, chunk_size, cap, 1 / n_valid)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


class LinearCrossEntropyScaled(torch.autograd.Function):
    """LinearCrossEntropy for float16 inputs, whose gradients need GradScaler's loss scale.

    (softmax - one_hot) / n_valid is mostly far below fp16's smallest number (6e-8) when cast before the scale is
    applied: at 65536 tokens every probability under ~4e-3 becomes 0. The scale only arrives as grad_loss in
    backward, so forward keeps only x and weight, and backward makes each chunk's logits again, scales the gradient
    by grad_loss / n_valid in float32 and only then casts: the precision of an ordinary fp16 lm_head under the same
    scale, for one more lm_head matmul.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, cap=None):
        n_valid = (targets != -1).sum().clamp(min=1)
        ctx.save_for_backward(x, weight, targets, n_valid)
        ctx.chunk_size, ctx.cap = chunk_size, cap
        return chunked_loss(x, weight, targets, chunk_size, cap)[0] / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, n_valid = ctx.saved_tensors
        # loss scale / accumulation steps / tokens, in float32
        _, grad_x, grad_w = chunked_loss(x, weight, targets, ctx.chunk_size, ctx.cap, grad_loss.float() / n_valid)
        return grad_x, grad_w.to(weight.dtype), None, None, None


# Run eagerly, not traced by torch.compile: Inductor's partitioner would merge backward's recomputed chunk logits
# with the forward's and save all of them (B*T*vocab*2 bytes), the memory the chunks are there to save
@torch.compiler.disable
def scaled_linear_cross_entropy(x, weight, targets, chunk_size, cap):
    return LinearCrossEntropyScaled.apply(x, weight, targets, chunk_size, cap)


def chunked_cross_entropy(x, weight, targets, chunk_size, cap=None):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) without the full logits (soft-capped if cap)."""
    if torch.is_autocast_enabled(x.device.type):  # the lm_head matmul in the autocast dtype, as nn.Linear would do it
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        x = x.to(weight.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        # fp16 cannot hold the gradients before GradScaler's scale multiplies them: they wait for backward
        if x.dtype == torch.float16:
            return scaled_linear_cross_entropy(x, weight, targets, chunk_size, cap)
        return LinearCrossEntropy.apply(x, weight, targets, chunk_size, cap)
    return chunked_loss(x, weight, targets, chunk_size, cap)[0] / (targets != -1).sum().clamp(min=1)


def default_loss_chunk_size(device):
    # a chunk's float32 logits take chunk x vocab x 4 bytes (824 MB at 4096): a GPU wants few, large matmuls;
    # on a CPU smaller chunks halve a step's peak memory and run no slower (measured with bench.py)
    return 4096 if device.type == "cuda" else 1024


# -----------------------------------------------------------------------------
# The model: GPT, and its Hugging Face import and export


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.arch not in ARCHS:
            raise ValueError(f"unknown arch {config.arch!r}: use one of {', '.join(ARCHS)}")
        modern = config.arch == "modern"
        if modern and (config.n_embd // config.n_head) % 2:
            raise ValueError("--arch modern needs an even head size for rotary embeddings, got "
                             f"{config.n_embd}/{config.n_head}")
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not modern:  # modern: positions enter as rotations of q and k instead
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers.update(h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]), ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.ZERO_INIT = modern
        self.loss_chunk_size = None  # rows per chunk of the training loss; 0 = full logits; None = by device
        self.softcap = LOGIT_SOFTCAP if modern else None
        if modern:  # rotary cos/sin, derived from the config: not saved in checkpoints
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        else:
            # weight tying (as in GPT-2): the token embedding is also the output projection; saves 38M parameters
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Which weight gets which init:
        - wte, wpe (embeddings) and every other Linear weight: normal, std 0.02 (OpenAI's GPT-2);
        - attn.c_proj and mlp.c_proj (RESIDUAL_PROJ), the two projections each block adds into the residual stream:
          std 0.02 / sqrt(2 * n_layer), which keeps the stream's variance from growing with depth; modern: zeros;
        - lm_head: tied to wte (gpt2); zeros (modern, ZERO_INIT);
        - biases: zeros. Norms keep PyTorch's init (LayerNorm: gain 1, bias 0; RMSNorm has no parameters).
        Modern's zeros make every block start as the identity and the first logits uniform; gradients reach the
        other weights from the second step on."""
        if isinstance(module, nn.Linear):
            std = 0.02
            residual = getattr(module, "RESIDUAL_PROJ", False)
            if residual:
                std *= (2 * self.config.n_layer) ** -0.5
            if self.config.arch == "modern" and (residual or getattr(module, "ZERO_INIT", False)):
                torch.nn.init.zeros_(module.weight)
            else:
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() lists the tied wte/lm_head once (gpt2)

    def hidden_states(self, idx, kv_caches=None):
        """The final LayerNorm's output (B, T, n_embd). With kv_caches, idx continues the cached positions."""
        B, T = idx.size()
        start = kv_caches[0].length if kv_caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        if self.config.arch == "modern":
            # the embedding normalized like every block input; positions are rotations of q and k
            x = rms_norm(self.transformer.wte(idx))
            rotary = (self.rotary_cos[start : start + T], self.rotary_sin[start : start + T])
        else:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
            rotary = None
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches else None, rotary)
        return self.transformer.ln_f(x)

    def head(self, x):
        """The logits of hidden states x: the lm_head, soft-capped (in float32) for the modern arch."""
        logits = self.lm_head(x)
        return logits if self.softcap is None else softcap(logits, self.softcap)

    def forward(self, idx, targets=None):
        """(logits, loss). Without targets: the logits of every position and no loss. With targets (-1 = ignored):
        the mean cross-entropy, and logits None when the loss was computed in chunks (see loss_chunk_size)."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.head(x), None
        chunk = self.loss_chunk_size if self.loss_chunk_size is not None else default_loss_chunk_size(idx.device)
        if not chunk:
            logits = self.head(x)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        x, targets = x.view(-1, x.size(-1)), targets.reshape(-1)
        return None, chunked_cross_entropy(x, self.lm_head.weight, targets, chunk, self.softcap)

    def logits_at(self, idx, positions):
        """The logits of the positions where the (B, T) bool mask `positions` is True, as (N, vocab_size).
        Scoring a few tokens (HellaSwag endings) then skips most of the lm_head, a small model's largest matmul."""
        return self.head(self.hidden_states(idx)[positions])

    # ---- sampling

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it.

        Keys and values are cached, so each new token runs the model on one position. Once the sequence is
        longer than block_size the context is cropped to the last block_size tokens; absolute position
        embeddings then shift every step, so the cache cannot be reused and each token costs a full forward.
        (Rotary embeddings, --arch modern, are relative and could keep the cache; it is recomputed all the same.)
        top_k=1 (or temperature=0) is greedy decoding.
        """
        config = self.config
        B = idx.size(0)
        n_real = min(config.vocab_size, GPT2_VOCAB)
        dtype = next(self.parameters()).dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        caches = None
        for _ in range(max_new_tokens):
            if idx.size(1) <= config.block_size:
                if caches is None:  # prefill the cache with the whole prompt
                    hs = config.n_embd // config.n_head
                    caches = [KVCache(B, config.n_head, hs, config.block_size, dtype, idx.device)
                              for _ in range(config.n_layer)]
                    x = self.hidden_states(idx, caches)
                else:
                    x = self.hidden_states(idx[:, -1:], caches)
            else:
                x = self.hidden_states(idx[:, -config.block_size :])
            logits = self.head(x[:, -1, :]).float()
            logits[:, n_real:] = -float("inf")  # padded vocab rows are not tokens
            if temperature == 0 or top_k == 1:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, n_real))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ---- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a local Hugging Face GPT-2 directory or NanoChat
        one (--arch modern), or a checkpoint .pt written by this script."""
        accepted = (
            f"expected one of {', '.join(MODEL_SIZES)} (downloaded from the Hugging Face hub), a directory with a "
            "Hugging Face GPT-2 or NanoChat checkpoint (config.json + weights), or a .pt checkpoint written by "
            "train_gpt2.py"
        )
        name_or_path = str(name_or_path)
        if name_or_path in MODEL_SIZES or os.path.isdir(name_or_path):
            kind = checks.check_hf_dir(name_or_path, accepted) if os.path.isdir(name_or_path) else "gpt2"
            if kind == "nanochat":  # --arch modern
                sizes, sd = huggingface.load_nanochat(name_or_path, ROTARY_BASE, LOGIT_SOFTCAP)
            else:  # Hugging Face's names are ours; its Conv1D weights come transposed
                sizes, sd = huggingface.load_gpt2(name_or_path)
            model = cls(GPTConfig(**sizes, arch="modern" if kind == "nanochat" else "gpt2"))
            model.load_state_dict(sd)
            return model
        if os.path.isfile(name_or_path):
            checkpoint = checkpoints.read(name_or_path)
            checkpoints.check_model(checkpoint, name_or_path, GPTConfig, cls)  # the weights fit the config
            model = cls(GPTConfig(**checkpoint["config"]))
            model.load_state_dict(checkpoint["model"])
            return model
        if name_or_path.endswith(".pt") or os.sep in name_or_path:
            raise ValueError(f"{name_or_path}: no such file or directory; check the path ({accepted})")
        raise ValueError(f"unknown model {name_or_path!r}: {accepted}")

    def save_pretrained(self, directory, tokenizer=True):
        """Write a Hugging Face directory (config.json + model.safetensors) that AutoModelForCausalLM.from_pretrained
        loads: GPT-2 (GPT2LMHeadModel) or, for --arch modern, NanoChat (NanoChatForCausalLM, transformers >= 5.0).
        A padded vocab is cut back to the 50257 real tokens (the soft-cap is per logit: the rest are unchanged).
        tokenizer: also write GPT-2's tokenizer, so pipeline() and lm-eval-harness need nothing else."""
        c, sd = self.config, self.state_dict()
        if c.arch == "modern":
            hf = huggingface.export_nanochat(sd, c, ROTARY_BASE, LOGIT_SOFTCAP)
        else:
            hf = huggingface.export_gpt2(sd, c)
        hf.save_pretrained(directory)
        if tokenizer:
            huggingface.save_gpt2_tokenizer(directory, model_max_length=c.block_size)


# -----------------------------------------------------------------------------
# The data


@functools.lru_cache(maxsize=2)
def tokenize_text_file(path):
    """A .txt file as GPT-2 tokens: the first 90% is the train split, the last 10% the val split."""
    text = checks.read_text_file(path)
    tokens = np.array(common.gpt2_tokenizer().encode_ordinary(text), dtype=np.uint16)
    n_val = len(tokens) // 10
    return {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}


def find_shards(data_root, split):
    """The token arrays of a split: .npy shards (memory-mapped) in a directory, or a .txt file tokenized now."""
    checks.check_data_path(data_root)
    if str(data_root).endswith(".txt"):
        return [tokenize_text_file(str(data_root))[split]]
    paths = sorted(glob.glob(os.path.join(data_root, f"*{split}*.npy")))
    if not paths:
        raise UsageError(f"no {split} shards (*{split}*.npy) in {data_root}: run `python fineweb.py` to make them")
    return [checks.check_shard(p) for p in paths]  # memory-mapped, after checking they hold GPT-2 tokens


class DataLoaderLite:
    """Batches of B sequences of T tokens from a split's shards.

    In order (the default, the seed's): rank r reads the B*T+1 tokens at B*T*r, then steps by B*T*num_processes, so
    that in one pass the ranks together read each batch-sized piece of the split once. A rank moves to the next shard
    only when its next batch no longer fits in this one, and wraps around to the first shard after the last.

    shuffle=True: each epoch visits the shards in a random order and, within each shard, its batch-sized windows (the
    B*T+1 tokens at each multiple of B*T) in a random order, both drawn from (seed, epoch). Every rank computes the
    same list and takes every num_processes-th window of it, so each window is read once per epoch by one rank; the
    last (windows % num_processes) of an epoch's list are left out, so that all ranks start each epoch together. The
    state is (epoch, windows read), and the plan of an epoch is recomputed from it on resume.

    epoch: the pass over the data that the last batch came from (0 = the first).
    """

    def __init__(self, B, T, process_rank=0, num_processes=1, split="train", data_root="edu_fineweb10B",
                 shuffle=False, seed=0):
        assert split in ("train", "val")
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.split, self.data_root = split, data_root
        self.shuffle, self.seed = shuffle, seed
        self._read_ahead = common.ReadAhead()  # the next window of a shuffled epoch, while this one trains
        self.shards = find_shards(data_root, split)
        if shuffle and sum(self._windows_per_shard()) < num_processes:
            raise UsageError(f"the {split} split of {data_root} holds fewer than {num_processes} batches of B={B} x "
                             f"T={T}, one for each rank; lower --batch_size or --seq_len")
        if not shuffle and not any(len(s) >= B * T * (process_rank + 1) + 1 for s in self.shards):
            longest = max(len(s) for s in self.shards)
            raise UsageError(f"the {split} split of {data_root} is too small: its longest shard has {longest} tokens, "
                             f"but rank {process_rank} needs {B * T * (process_rank + 1) + 1} for one batch of B={B} x "
                             f"T={T}; lower --batch_size or --seq_len")
        self.reset()

    def reset(self):
        self.epoch = 0
        if self.shuffle:
            self.index, self._plan = 0, None  # windows of this rank read in this epoch; (epoch, shards, offsets)
            return
        self.current_shard = -1
        self._next_shard()

    def _next_shard(self):
        # skip shards too short to hold this rank's first batch
        while True:
            if self.current_shard == len(self.shards) - 1:
                self.epoch += 1  # wrapping around: the data repeats
            self.current_shard = (self.current_shard + 1) % len(self.shards)
            self.current_position = self.B * self.T * self.process_rank
            if self._fits():
                return

    def _fits(self):
        return self.current_position + self.B * self.T + 1 <= len(self.shards[self.current_shard])

    def _windows_per_shard(self):
        return [(len(s) - 1) // (self.B * self.T) for s in self.shards]

    def epoch_plan(self, epoch):
        """(shard, offset) arrays of the windows this rank reads in `epoch`, in order (shuffle=True)."""
        rng = np.random.default_rng([self.seed, epoch])
        counts = self._windows_per_shard()
        order = rng.permutation(len(self.shards))
        shards = np.concatenate([np.full(counts[s], s, dtype=np.int64) for s in order])
        offsets = np.concatenate([rng.permutation(counts[s]).astype(np.int64) * self.B * self.T for s in order])
        usable = len(shards) // self.num_processes * self.num_processes
        mine = slice(self.process_rank, usable, self.num_processes)
        return shards[mine], offsets[mine]

    def epoch_tokens(self):
        """The tokens that all ranks together read in one epoch."""
        BT, world = self.B * self.T, self.num_processes
        if self.shuffle:
            return sum(self._windows_per_shard()) // world * world * BT
        # in order, rank r reads the batches at BT*r + k*BT*world that fit in each shard
        return BT * sum((len(s) - 1 - BT * (r + 1)) // (BT * world) + 1
                        for s in self.shards for r in range(world) if len(s) - 1 >= BT * (r + 1))

    def _batch(self, shard, position):
        B, T = self.B, self.T
        buf = torch.from_numpy(self.shards[shard][position : position + B * T + 1].astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: the next token at each position
        return x, y

    def next_batch(self):
        if self.shuffle:
            if self._plan is None or self._plan[0] != self.epoch:
                self._plan = (self.epoch, *self.epoch_plan(self.epoch))
            if self.index == len(self._plan[1]):
                self.epoch, self.index = self.epoch + 1, 0
                self._plan = (self.epoch, *self.epoch_plan(self.epoch))
            shard, offset = self._plan[1][self.index], self._plan[2][self.index]
            self.index += 1
            if self.index < len(self._plan[1]):
                after = int(self._plan[1][self.index])
                self._read_ahead(self.shards[after], int(self._plan[2][self.index]), self.B * self.T + 1)
            return self._batch(int(shard), int(offset))
        # move on only when the next batch is asked for, so that `epoch` is that of the last batch returned
        if not self._fits():
            self._next_shard()
        x, y = self._batch(self.current_shard, self.current_position)
        self.current_position += self.B * self.T * self.num_processes
        return x, y

    def state_dict(self):
        # the shard sizes identify the data (not its path: a cluster job may find it at another path when resumed)
        state = {"epoch": self.epoch, "shard_tokens": [len(s) for s in self.shards]}
        if self.shuffle:
            return {**state, "shuffle": True, "seed": self.seed, "index": self.index}
        return {**state, "shard": self.current_shard, "position": self.current_position}

    def load_state_dict(self, state):
        saved, here = state.get("shard_tokens"), [len(s) for s in self.shards]
        if saved is not None and saved != here:  # None: a checkpoint from before shard_tokens
            raise UsageError(f"the {self.split} data in {self.data_root} ({len(here)} shards, {sum(here)} tokens) is "
                             f"not the data the checkpoint was trained on ({len(saved)} shards, {sum(saved)} tokens); "
                             "point --data at that data")
        if bool(state.get("shuffle")) != self.shuffle:
            raise UsageError(f"the checkpoint's data order is {'shuffled' if state.get('shuffle') else 'in order'}: "
                             f"resume {'with' if state.get('shuffle') else 'without'} --shuffle")
        self.epoch = state.get("epoch", 0)
        if self.shuffle:
            self.seed, self.index, self._plan = state["seed"], state["index"], None
        else:
            self.current_shard, self.current_position = state["shard"], state["position"]


class ValSet:
    """The tokens of the val loss: the first n_tokens of the val split (its shards read as one stream), as
    n_tokens // T windows; window i holds tokens i*T .. i*T+T (T inputs, and the next token of each as its target).

    Rank r takes windows r, r + num_processes, ...; in micro-batches of B. Every rank runs the same number of
    micro-batches (the last ones padded with windows whose targets are -1, ignored): forward passes stay in step
    across ranks, and the mean over tokens is the same whatever B and the number of ranks.
    """

    def __init__(self, B, T, process_rank=0, num_processes=1, data_root="edu_fineweb10B", n_tokens=10485760):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shards = find_shards(data_root, "val")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # where each shard begins in the stream
        self.split_tokens = int(self.starts[-1])
        self.n_windows = min(n_tokens // T, (self.split_tokens - 1) // T)  # the last window needs one more target
        if self.n_windows < 1:
            raise UsageError(f"the val split of {data_root} ({self.split_tokens} tokens) or --val_tokens {n_tokens} is "
                             f"shorter than one window of --seq_len {T} (+1)")
        self.n_tokens = self.n_windows * T

    def _read(self, start, length):
        """Tokens start .. start+length of the stream, across shard boundaries."""
        parts, end = [], start + length
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            take = min(end, int(self.starts[i + 1])) - start
            parts.append(self.shards[i][start - self.starts[i] : start - self.starts[i] + take])
            start, i = start + take, i + 1
        return np.concatenate(parts).astype(np.int64)

    def num_batches(self):
        """Micro-batches per rank: enough for the rank with the most windows."""
        per_rank = -(-self.n_windows // self.num_processes)  # ceil
        return -(-per_rank // self.B)

    def batches(self):
        """(x, y, number of real targets) for each of this rank's micro-batches."""
        B, T = self.B, self.T
        mine = range(self.process_rank, self.n_windows, self.num_processes)
        for b in range(self.num_batches()):
            windows = mine[b * B : (b + 1) * B]
            x = torch.zeros(B, T, dtype=torch.long)
            y = torch.full((B, T), -1, dtype=torch.long)  # padding rows: ignored by the loss
            for row, i in enumerate(windows):
                buf = torch.from_numpy(self._read(i * T, T + 1))
                x[row], y[row] = buf[:-1], buf[1:]
            yield x, y, len(windows) * T


# -----------------------------------------------------------------------------
# Optimization


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps, schedule="cosine", decay_frac=0.2):
    """Linear warmup to max_lr, then down to min_lr at max_steps, min_lr after.
    cosine: cosine decay over all the steps after warmup (GPT-3 paper).
    wsd (warmup-stable-decay, a trapezoid): max_lr until the last decay_frac of the steps, then linear to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return max_lr
        return max_lr + (step - decay_start) / (max_steps - decay_start) * (min_lr - max_lr)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def adamw(groups, lr, device_type):
    """AdamW as in GPT-3: betas (0.9, 0.95), eps 1e-8. The fused kernel does the whole update in a few kernels
    instead of a loop over tensors (CUDA; CPU too)."""
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def configure_optimizers(model, weight_decay, learning_rate, device_type):
    """The seed's AdamW: weight decay on the matmul weights and embeddings (dim >= 2), never on biases or gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return adamw(groups, learning_rate, device_type)


# Muon (Keller Jordan, 2024; the optimizer of modded-nanogpt's speed records) updates a weight matrix with its
# momentum made (nearly) orthogonal: every singular value of the update becomes ~1, so the rare directions of the
# gradient move as fast as the dominant ones. It is for the 2-D matrices inside the transformer blocks; embeddings,
# the output head, biases and norm gains keep AdamW.


# quintic Newton-Schulz coefficients from Keller Jordan's Muon: picked for the steepest slope at 0, so 5 iterations
# lift even tiny singular values to 0.7..1.2 (not exactly 1; that is fine for training and much cheaper than an SVD)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, dtype=torch.bfloat16):
    """An approximately orthogonal matrix with G's singular vectors (U V^T of G = U S V^T), computed in dtype:
    bfloat16 is precise enough for a roughly orthogonal result, and fast where matmuls have it natively."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    wide = X.size(0) <= X.size(1)
    if not wide:  # iterate on the smaller Gram matrix X X^T
        X = X.T
    X = X / (X.norm() + 1e-7)  # the Frobenius norm bounds the spectral norm: all singular values now <= 1
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X  # each singular value s -> a s + b s^3 + c s^5
    return X if wide else X.T


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalized by Newton-Schulz, for 2-D weights only.

    The update of a (rows, cols) matrix is scaled by max(1, rows/cols)**0.5: an orthogonal update has RMS
    1/sqrt(max(rows, cols)), and the scale makes it 1/sqrt(cols) for every shape, i.e. the same change of the
    output per unit of input for a square, a tall (c_fc, c_attn) or a wide (c_proj) matrix. It is the scaling of
    Keller Jordan's Muon and modded-nanogpt, so their learning rates (0.02-0.05) carry over. Weight decay is
    decoupled (p -= lr * weight_decay * p) as in AdamW. The momentum buffers are the optimizer state.
    ns_dtype: Newton-Schulz's matmul dtype, not saved in checkpoints (a run may resume on other hardware)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5,
                 ns_dtype=torch.bfloat16):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only; give the other parameters to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # an average of past gradients
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf  # Nesterov: look one step ahead
                update = newton_schulz(update, group["ns_steps"], self.ns_dtype)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
        return loss


class MultiOptimizer:
    """Several torch optimizers stepped as one (AdamW for some parameters, Muon for the others): the single object
    train_step, GradScaler (unscale_ and step only need param_groups and step()) and checkpoints see."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self):
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for opt in self.optimizers:
            opt.step()

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer is not this run's (--optimizer differs)")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


def make_optimizer(model, args, device_type, ns_dtype=torch.bfloat16):
    """adamw: configure_optimizers, the seed's; muon: Muon for the blocks' 2-D matrices, AdamW for the rest.
    lr_bounds: each param group's (peak, final) learning rate for set_lr, kept outside the param groups (which
    load_state_dict replaces with the checkpoint's): a resumed run's schedule is its own flags'."""
    if args.optimizer == "adamw":
        optimizer = configure_optimizers(model, args.weight_decay, args.max_lr, device_type)
        optimizer.lr_bounds = [(args.max_lr, args.min_lr)] * len(optimizer.param_groups)
        return optimizer
    muon_params, rest = [], []  # Muon: the 2-D matrices inside the transformer blocks (whatever the block is)
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon_params if name.startswith("transformer.h.") and p.dim() == 2 else rest).append(p)
    embed_lr = args.embed_lr or args.max_lr
    final = args.min_lr / args.max_lr  # each group decays to this fraction of its peak, as AdamW's does
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay, "lr": embed_lr},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr": args.max_lr},
    ]
    rest_opt = adamw(groups, args.max_lr, device_type)
    muon = Muon(muon_params, lr=args.muon_lr, momentum=args.muon_momentum, weight_decay=args.muon_weight_decay,
                ns_dtype=ns_dtype)
    optimizer = MultiOptimizer(rest_opt, muon)
    optimizer.lr_bounds = [(embed_lr, embed_lr * final), (args.max_lr, args.min_lr),
                           (args.muon_lr, args.muon_lr * final)]
    return optimizer


def set_lr(optimizer, step, args, decay_steps):
    """Each param group's learning rate for this step, on the schedule between its own bounds (the schedule ends at
    decay_steps, see lr_decay_steps); returns the first group's."""
    for group, (peak, final) in zip(optimizer.param_groups, optimizer.lr_bounds):
        group["lr"] = get_lr(step, peak, final, args.warmup_steps, decay_steps, args.schedule, args.decay_frac)
    return optimizer.param_groups[0]["lr"]


# -----------------------------------------------------------------------------
# Checkpoints: everything a run needs to continue exactly (model, optimizer, config, flags, step, the data positions
# and RNG states of every rank); checkpoints.py writes, finds and checks the files


def load_checkpoint(path, resume=False):
    """A checkpoint of ours, checked inside (config, weights, and with resume the training state), so that a foreign
    or damaged one is a one-line error here, not a traceback from load_state_dict later."""
    checkpoint = checkpoints.read(path)
    model = checkpoints.check_model(checkpoint, path, GPTConfig, GPT)
    if resume:
        checkpoints.check_training_state(checkpoint, path, model)
    return checkpoint


def find_resume_checkpoint(log_dir, ctx=None):
    """(path, checkpoint) of the newest checkpoint in log_dir that loads, damaged ones reported and skipped; or
    (None, None) when log_dir holds none: the first start of a job that every restart runs again as it is.
    Rank 0 picks, the other ranks load its pick: on NFS, nodes can list different checkpoints."""
    loaded = {}

    def pick():
        found = checkpoints.list_checkpoints(log_dir)
        for _, path in found:
            try:
                loaded[path] = load_checkpoint(path, resume=True)
                return path
            except UsageError as e:
                print(f"skipping {path}: {e}")
        if found:
            raise UsageError(f"--resume: none of the {len(found)} checkpoints in {log_dir} loads; pass --resume PATH "
                             "to one that does, or start over there with --overwrite instead of --resume")

    path = common.decided_by_rank0(pick, ctx)
    return path, loaded[path] if path in loaded else path and load_checkpoint(path, resume=True)


# -----------------------------------------------------------------------------
# The run: what train() sets up once and its steps share


@dataclass
class Run:
    """A training run's state besides its flags (args, which nothing writes into). Checkpoints save the flags with
    what the run decided itself (flags())."""

    args: argparse.Namespace
    ctx: common.DistContext
    precision: torch.dtype  # what the run trains in (float32, bfloat16 or float16); a resumed run keeps its own
    batch_size: int = None  # the micro-batch: --batch_size, what 'auto' chose, or the resumed run's
    lr_decay_steps: int = None  # where the LR schedule ends: --max_steps, or a resumed run's (which --extend keeps)
    model: nn.Module = None  # the plain model: sampling, HellaSwag and checkpoints use it
    train_model: nn.Module = None  # what the training steps run: compiled, in DDP, or sharded (FSDP)
    optimizer: object = None
    scaler: torch.amp.GradScaler = None
    train_loader: object = None  # anything with next_batch(), state_dict() and load_state_dict()
    val_set: object = None
    sample_generator: torch.Generator = None

    @property
    def autocast_dtype(self):  # FSDP casts the weights itself, and autocast on top would only cast them again
        return torch.float32 if sharding.is_sharded(self.model) else self.precision

    @property
    def accum_steps(self):
        return self.args.total_batch_size // (self.batch_size * self.args.seq_len * self.ctx.world_size)

    @property
    def log_file(self):
        return os.path.join(self.args.log_dir, "log.txt")

    def flags(self):
        """The flags as checkpoints save them ("args"), with the run's precision, micro-batch and schedule end."""
        decided = dict(precision=str(self.precision).replace("torch.", ""), batch_size=self.batch_size,
                       lr_decay_steps=self.lr_decay_steps)
        return {**vars(self.args), **decided}


def new_model(args):
    """The model of a new run: from scratch, or --init_from's weights."""
    with common.model_errors_as_usage_errors():
        if args.init_from == "scratch":
            return GPT(model_config(args.model, args.vocab_size, arch=args.arch))
        model = GPT.from_pretrained(args.init_from)
    # the weights decide the architecture; a different --arch is a mistake to report, not to ignore
    if model.config.arch != args.arch:
        raise UsageError(f"--init_from {args.init_from} is an --arch {model.config.arch} model, not {args.arch}: "
                         f"pass --arch {model.config.arch}")
    return model


def load_or_build_model(run):
    """(model, checkpoint): the model of the checkpoint to resume (checkpoint is then its dict), or a new one.
    Sets the run's micro-batch (a resumed 'auto' run keeps its own) and where its schedule ends."""
    args = run.args
    if not args.resume:
        if checkpoints.list_checkpoints(args.log_dir) and not args.overwrite:
            raise UsageError(f"{args.log_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                             "--overwrite to start over there, or choose another --log_dir")
        return new_model(args), None
    if args.resume == "auto":
        path, checkpoint = find_resume_checkpoint(args.log_dir, run.ctx)
        if checkpoint is None:  # so that the first start and every restart can be the same command
            if args.extend:
                raise UsageError(f"--extend: {args.log_dir} holds no checkpoint to train on from; pass the run's "
                                 "--log_dir, or drop --extend to start a new run")
            common.print0(f"--resume: no checkpoint in {args.log_dir}, starting a new run there")
            return new_model(args), None
    else:
        path, checkpoint = args.resume, load_checkpoint(args.resume, resume=True)
    if args.batch_size == "auto":  # the micro-batch the run chose
        run.batch_size = checkpoint["args"]["batch_size"]
    checkpoints.check_resume_compatible(checkpoint, run.flags(), run.ctx.world_size)
    run.lr_decay_steps = checkpoint["args"]["lr_decay_steps"]  # --extend trains on at the end of the old schedule
    checkpoint["path"] = path
    with torch.device(run.ctx.device):  # built where it trains: no CPU copy of the model on each rank
        model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


def make_loaders(args, ctx, B):
    """The train loader, and the val set (None when --val_every is 0); says how many epochs the run is."""
    T = args.seq_len
    train_loader = DataLoaderLite(B, T, ctx.rank, ctx.world_size, "train", args.data, shuffle=args.shuffle,
                                  seed=args.seed)
    epoch_tokens = train_loader.epoch_tokens()
    epochs = args.max_steps * args.total_batch_size / epoch_tokens
    common.print0(f"train data: {epoch_tokens:,} tokens an epoch ({'shuffled' if args.shuffle else 'in order'}); "
                  f"{args.max_steps} steps x {args.total_batch_size:,} tokens = {epochs:.3g} epochs")
    if epochs > 1:
        common.print0(f"warning: this run reads its train data {epochs:.3g} times over (log.txt marks each new epoch "
                      "with `STEP epoch N`)")
    if not args.val_every:
        return train_loader, None
    val_tokens = args.val_tokens
    if args.val_steps is not None:
        val_tokens = args.val_steps * B * T * ctx.world_size
        common.print0(f"--val_steps is deprecated: --val_steps {args.val_steps} here means --val_tokens {val_tokens} "
                      f"({args.val_steps} x {B} x {T} x {ctx.world_size} ranks); use --val_tokens")
    val_set = ValSet(B, T, ctx.rank, ctx.world_size, args.data, val_tokens)
    if val_set.n_tokens != val_tokens:
        common.print0(f"note: --val_tokens {val_tokens} cut to {val_set.n_tokens}, whole windows of {T} that the val "
                      f"split ({val_set.split_tokens:,} tokens) holds")
    common.print0(f"val loss: the mean over the first {val_set.n_tokens:,} tokens of the val split "
                  f"({val_set.n_windows} windows of {T})")
    return train_loader, val_set


def wrap_model(model, args, ctx):
    """The model that runs the training (and val) forward passes: compiled, and under torchrun wrapped in DDP,
    which averages the gradients over ranks during backward. Under FSDP, the model is sharded in place and only its
    blocks are compiled, for training only (sharding.compile_blocks). Everything else uses the plain model."""
    if args.fsdp:
        if args.compile:
            sharding.compile_blocks(model)
        return model
    wrapped = torch.compile(model) if args.compile else model
    if ctx.ddp:
        device_ids = [torch.device(ctx.device)] if ctx.device_type == "cuda" else None  # not local_rank (GPU per task)
        wrapped = DDP(wrapped, device_ids=device_ids, **sharding.ddp_without_buffer_sync())
    return wrapped


def build_run(args, ctx, model=None):
    """A run set up from its flags, as train() and bench.py train: the model (new, or the checkpoint's to resume,
    which is returned too; or `model`, bench.py's transformers GPT-2), placed on the device (sharded under FSDP),
    the micro-batch, the loss path, the data, the optimizer and the loss scaler. None for a finished run."""
    batch_size = None if args.batch_size == "auto" else args.batch_size
    run = Run(args, ctx, common.setup_device(args.dtype, args.seed, ctx), batch_size, lr_decay_steps=args.max_steps)
    checkpoint = None
    if model is None:
        model, checkpoint = load_or_build_model(run)
    if checkpoint is not None and checkpoint["step"] >= args.max_steps:  # schedulers run finished jobs again
        common.print0(f"{checkpoint['path']}: the run already reached --max_steps {args.max_steps}; nothing to do "
                      "(--extend --max_steps N trains on)")
        return None, None
    checks.check_run_inputs(args, ctx)  # Tiny Shakespeare downloaded, the tokenizer at hand, --data's path
    T = args.seq_len
    checks.check_seq_len(T, model.config.block_size)
    run.model = model.to(ctx.device)
    if args.fsdp:  # before --batch_size auto, which probes the shards
        sharding.shard_model(model, ctx, run.precision)
    fused_head = bool(args.compile) and not args.fsdp  # torch.compile sees the head and the loss together

    def loss_chunk_size(B):  # the loss path of a micro-batch B, for training and for --batch_size auto's probes
        if args.loss_chunk_size is not None:
            return args.loss_chunk_size
        full = sharding.full_logits_fit(model, ctx, B, T, fused_head)
        return 0 if full else default_loss_chunk_size(torch.device(ctx.device_type))

    if run.batch_size is None:
        dtype = run.autocast_dtype
        run.batch_size = sharding.choose_batch_size(model, ctx, dtype, T, args.total_batch_size, loss_chunk_size)
        common.print0(f"--batch_size auto: micro-batch {run.batch_size}")
    checks.check_batch(args.total_batch_size, run.batch_size, T, ctx.world_size)
    model.loss_chunk_size = loss_chunk_size(run.batch_size)
    run.train_loader, run.val_set = make_loaders(args, ctx, run.batch_size)
    checks.check_hellaswag_data(args)
    run.train_model = wrap_model(model, args, ctx)
    # Newton-Schulz in bf16 only where the run's matmuls are bf16: emulated (a CPU without AVX512-BF16/AMX, an fp16
    # GPU) it took 5.7 s of a 15 s step of the CPU quickstart, fp32 0.2 s
    ns_dtype = torch.bfloat16 if run.precision == torch.bfloat16 else torch.float32
    run.optimizer = make_optimizer(model, args, ctx.device_type, ns_dtype)
    # fp16 overflows where bf16 does not: scale the loss up so small gradients survive, and skip steps that overflow
    run.scaler = torch.amp.GradScaler(ctx.device_type, enabled=run.precision == torch.float16)
    run.sample_generator = torch.Generator(device=ctx.device).manual_seed(42 + ctx.rank)
    return run, checkpoint


def start_or_resume(run, checkpoint):
    """(start step, last val loss): the checkpoint's, with the optimizer, data and RNG states restored;
    or step 0 with a fresh log (and the earlier run's checkpoints deleted if --overwrite)."""
    args, ctx = run.args, run.ctx
    if checkpoint is None:
        if ctx.master:
            # an old checkpoint left behind would be the one a later --resume picks: stop instead
            failed = checkpoints.prune_checkpoints(args.log_dir, keep=0) if args.overwrite else []
            if failed:
                raise UsageError(f"--overwrite: cannot delete {failed[0]}; delete it or use another --log_dir")
            open(run.log_file, "w").close()
        return 0, None
    sharding.load_optimizer_state(run.model, run.optimizer, checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint.get("scaler", {}))
    run.train_loader.load_state_dict(checkpoint["train_loader"][ctx.rank])
    common.set_rng_state(checkpoint["rng"][ctx.rank], run.sample_generator)
    if ctx.master:
        checkpoints.truncate_log(run.log_file, checkpoint["step"])
        print(f"resuming from {checkpoint['path']} at step {checkpoint['step']}")
        if checkpoint["args"].get("data") != args.data:
            print(f"the data moved ({checkpoint['args'].get('data')} -> {args.data}); its shards are the checkpoint's")
    return checkpoint["step"], checkpoint.get("val_loss")


# -----------------------------------------------------------------------------
# The training step


def train_step(run):
    """One optimizer step of run.train_model over run.accum_steps micro-batches of run.train_loader, at the learning
    rates set_lr put in the param groups. Returns (mean loss, gradient norm) as floats; raises TrainingDiverged,
    before updating the weights, if the loss is not finite."""
    train_model, optimizer, scaler, ctx = run.train_model, run.optimizer, run.scaler, run.ctx
    train_model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=ctx.device)
    for micro_step in range(run.accum_steps):
        x, y = run.train_loader.next_batch()
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        # DDP all-reduces (FSDP reduce-scatters) gradients in backward; do it only once, after the last micro-step
        with sharding.gradient_sync(train_model, sync=not ctx.ddp or micro_step == run.accum_steps - 1):
            with common.autocast_context(ctx.device_type, run.autocast_dtype):
                loss = train_model(x, y)[1]  # the full-logits path's logits: freed now, not kept through backward
            # each micro-batch's loss is a mean over its tokens; dividing by the number of micro-steps makes
            # the summed gradients those of the mean over the whole batch, not a sum of means
            loss = loss / run.accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    loss_accum = common.all_reduce_mean(loss_accum, ctx)
    scaler.unscale_(optimizer)
    grad_clip = run.args.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    loss_value, norm_value = loss_accum.item(), norm.item()
    # with fp16 an inf norm is an overflow that GradScaler skips; otherwise a non-finite norm means divergence
    if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and not scaler.is_enabled()):
        raise TrainingDiverged(f"the loss is {loss_value} (grad norm {norm_value})")
    scaler.step(optimizer)
    scaler.update()
    return loss_value, norm_value


# -----------------------------------------------------------------------------
# Evaluation: the val loss, HellaSwag, samples


@torch.no_grad()
def evaluate_val(model, val_set, ctx, dtype):
    """The mean loss per token over the val set: summed losses and token counts of all ranks, so that it does not
    depend on the micro-batch or the number of ranks (each rank runs the same number of forward passes)."""
    model.eval()
    acc = torch.float32 if ctx.device_type == "mps" else torch.float64  # MPS has no float64
    total = torch.zeros(2, dtype=acc, device=ctx.device)  # summed loss, tokens
    for x, y, n in val_set.batches():
        x, y = x.to(ctx.device), y.to(ctx.device)
        with common.autocast_context(ctx.device_type, dtype):
            _, loss = model(x, y)
        if n:  # a micro-batch of padding only has a NaN mean (0/0)
            total[0] += loss.detach().to(acc) * n
            total[1] += n
    if ctx.ddp:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample(model, prompt, generator, dtype, num_samples=4, max_new_tokens=32, temperature=1.0, top_k=50):
    """num_samples continuations of prompt, as text."""
    enc = common.gpt2_tokenizer()
    model.eval()
    device = next(model.parameters()).device
    tokens = enc.encode(prompt) or [GPT2_EOT]
    idx = torch.tensor(tokens, dtype=torch.long, device=device).repeat(num_samples, 1)
    with common.autocast_context(device.type, dtype):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [enc.decode(row.tolist()) for row in out]


def run_evals(run, step, tracker):
    """The evaluations due at this step: val loss (returned, else None), HellaSwag, samples."""
    args, ctx, model, last_step = run.args, run.ctx, run.model, step == run.args.max_steps
    val_loss = None
    if args.val_every and (step % args.val_every == 0 or last_step):
        val_loss = evaluate_val(run.train_model, run.val_set, ctx, run.autocast_dtype)
        common.print0(f"validation loss: {val_loss:.4f}")
        tracker.log_eval(step, "val", val_loss)
    if args.hellaswag_every and (step % args.hellaswag_every == 0 or last_step):
        model.eval()
        # under FSDP each forward needs every rank: all ranks score all examples, in step
        rank, world_size = (0, 1) if args.fsdp else (ctx.rank, ctx.world_size)
        dtype = run.autocast_dtype
        n_correct, n_correct_norm, n_total = hellaswag.evaluate(
            model, ctx.device, data=args.hellaswag_data, rank=rank, world_size=world_size,
            autocast_dtype=None if dtype == torch.float32 else dtype,
        )
        common.print0(f"HellaSwag accuracy: {n_correct_norm}/{n_total}={n_correct_norm / n_total:.4f}")
        tracker.log_eval(step, "hella", n_correct_norm / n_total)
    # under FSDP every rank runs the sampling forward passes (each all-gathers the weights); rank 0 prints
    due = args.sample_every and ((step > 0 and step % args.sample_every == 0) or last_step)
    if (ctx.master or args.fsdp) and due:
        texts = sample(model, args.sample_prompt, run.sample_generator, run.autocast_dtype)
        for i, text in enumerate(texts):
            common.print0(f"sample {i}: {text}")
        tracker.log_text(step, "samples", texts)
    return val_loss


# -----------------------------------------------------------------------------
# The DDP loop


def save_checkpoint(run, step, val_loss, tracker):
    """Called on every rank (the data positions and RNG states of all ranks are gathered, FSDP's shards too); rank 0
    writes. Every rank stops (CheckpointWriteFailed) if the write failed, or if the weights are not finite."""
    model, ctx, log_dir = run.model, run.ctx, run.args.log_dir
    if not sharding.params_finite(model, ctx):
        raise TrainingDiverged(f"step {step}: the parameters hold NaN or inf; not writing a checkpoint. Lower "
                               f"--max_lr or resume from the last checkpoint in {log_dir}")
    loader_states = common.gather_objects(run.train_loader.state_dict(), ctx)
    rng_states = common.gather_objects(common.get_rng_state(run.sample_generator), ctx)
    model_state, optimizer_state = sharding.full_state_dicts(model, run.optimizer, ctx)  # on rank 0
    error = None
    if ctx.master:
        checkpoint = dict(model=model_state, optimizer=optimizer_state, scaler=run.scaler.state_dict(),
                          config=asdict(model.config), args=run.flags(), step=step, val_loss=val_loss,
                          world_size=ctx.world_size, train_loader=loader_states, rng=rng_states,
                          metrics=tracker.state())
        error = checkpoints.write(checkpoint, log_dir, step, run.args.keep_checkpoints)
    # also the barrier after the write: nobody moves on before the file is complete, or waits for a rank 0 that stopped
    if common.any_rank(error is not None, ctx, ctx.file_group):  # a long write does not time out (FILE_IO_TIMEOUT)
        raise CheckpointWriteFailed(error or "rank 0 could not write a checkpoint")


def train_loop(run, start_step, val_loss, tracker):
    """Steps start_step .. --max_steps, each with its due evaluations and checkpoint before its training step; stops
    early, with a checkpoint, on a stop signal. val_loss: the latest, saved with the checkpoints."""
    args, ctx = run.args, run.ctx
    timer = metrics.StepTimer()
    stop = common.StopSignal()
    stop.install()
    try:
        evals_done_at = start_step if start_step else -1  # a checkpoint is written after its step's evaluations
        for step in range(start_step, args.max_steps + 1):
            last_step = step == args.max_steps
            if step != evals_done_at:
                now = run_evals(run, step, tracker)
                val_loss = val_loss if now is None else now  # None: no val loss at this step

            stopping = stop.agreed(ctx)
            due = last_step or stopping or (args.checkpoint_every and step % args.checkpoint_every == 0)
            if step > start_step and due:
                save_checkpoint(run, step, val_loss, tracker)
                tracker.flush()
            if last_step or stopping:
                break

            t0 = time.time()
            lr = set_lr(run.optimizer, step, args, run.lr_decay_steps)
            epoch = run.train_loader.epoch
            try:
                loss, norm = train_step(run)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"step {step}: {e}; stopping without a checkpoint. Lower --max_lr or resume "
                                       f"from the last checkpoint in {args.log_dir}") from None
            if ctx.device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            timer.add(dt)
            common.print0(f"step {step:5d}/{args.max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt "
                          f"{dt * 1000:.1f}ms | tok/sec {args.total_batch_size / dt:.0f}{tracker.mfu_text(dt)} | eta "
                          f"{timer.eta(args.max_steps - step - 1)}")
            if run.train_loader.epoch != epoch:  # (rank 0's data) this step began a new pass over the train data
                tracker.new_epoch(step, run.train_loader.epoch + 1)
            if step == start_step:  # the optimizer state exists after the first step
                common.print0(sharding.state_memory_line(run.model, run.optimizer, ctx))
            tracker.log_step(step, loss, lr, norm, dt)
    finally:
        stop.restore()
        tracker.close()


def train(args, ctx):
    """The training run: a new one or a resumed one, set up by build_run, then train_loop."""
    run, checkpoint = build_run(args, ctx)
    if run is None:
        return
    os.makedirs(args.log_dir, exist_ok=True)  # once the inputs are checked: a mistake leaves nothing behind
    start_step, val_loss = start_or_resume(run, checkpoint)
    model, B, T = run.model, run.batch_size, args.seq_len
    common.print0(f"model: {model.config} | {model.num_params() / 1e6:.2f}M parameters")
    common.print0(f"device {ctx.device} x {ctx.world_size} | dtype {run.flags()['precision']} | compile "
                  f"{bool(args.compile)}{' | FSDP' if args.fsdp else ''}")
    common.print0(f"total batch {args.total_batch_size} tokens = {B} x {T} x {ctx.world_size} ranks x "
                  f"{run.accum_steps} accumulation steps")
    chunk = model.loss_chunk_size
    common.print0(f"loss: {f'chunks of {chunk} positions' if chunk else 'full logits'}")
    # TensorBoard, wandb, the MFU and log.txt's lines; a resumed run continues the checkpoint's curves
    tracker = metrics.Metrics(run, checkpoint)
    del checkpoint  # free its tensors
    if ctx.master:
        metrics.record_run(run, start_step)  # run.json; a note if the run will take days
    train_loop(run, start_step, val_loss, tracker)


# -----------------------------------------------------------------------------
# The command line


# --recipe presets: flag values, best at small scale on CPU (bench.py --mode recipe; docs/recipes.md)
RECIPE_PRESETS = {
    "gpt2": {},  # the seed's GPT-2 recipe: the flags' defaults
    # embed_lr: the AdamW lr of the embeddings and the untied head, 10x GPT-2's max_lr (modded-nanogpt's go higher)
    "fast": {"optimizer": "muon", "schedule": "wsd", "muon_lr": 0.02, "muon_momentum": 0.95, "decay_frac": 0.3,
             "arch": "modern", "embed_lr": 6e-3},
}
# README's quickstart: fast, sized for a CPU (d2, 160 steps of 2048 tokens of Tiny Shakespeare). Most of a step is
# the 50304-wide head, so width is what costs: at the same CPU time d2 ended at val 5.15 where d4 ended at 5.64, and
# 2048-token steps beat 4096-token ones per token (5.69 vs 5.76 after ~200k tokens)
RECIPE_PRESETS["shakespeare"] = {
    **RECIPE_PRESETS["fast"], "data": "input.txt", "model": "d2", "batch_size": 16, "seq_len": 128,
    "total_batch_size": 2048, "max_steps": 160, "warmup_steps": 10, "max_lr": 2e-3, "min_lr": 2e-4, "val_every": 80,
    "sample_every": 80, "hellaswag_every": 0, "compile": 0, "log_dir": "log_shakespeare", "sample_prompt": "ROMEO:",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train GPT-2 (defaults: the 124M reproduction on FineWeb-Edu 10B), or "
                                "sample from / export a model.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="edu_fineweb10B", help="a directory of uint16 .npy token shards (from "
                   "fineweb.py), or a .txt file tokenized at start (last 10%% = val); input.txt is downloaded if "
                   "missing")
    g.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or dN: N layers, width "
                   "64*N, N heads (d12 = gpt2)")
    g.add_argument("--arch", default="gpt2", choices=list(ARCHS), help="gpt2: OpenAI's GPT-2 block; modern: rotary "
                   "embeddings, RMSNorm, QK-norm, ReLU^2, no biases, zero-init projections, untied zero-init "
                   "lm_head, logits soft-capped at 15 (exports to Hugging Face as NanoChat, transformers >= 5.0)")
    g.add_argument("--vocab_size", type=int, default=50304, help="50257 padded up to a multiple of 128: GPU matmul "
                   "kernels run faster on round sizes; the extra ids never occur in the data, so the model learns to "
                   "ignore them")
    g.add_argument("--init_from", default="scratch", help="scratch, a hub name (gpt2, ...), a local Hugging Face "
                   "directory (GPT-2, or NanoChat: --arch modern), or a checkpoint .pt: start from its weights "
                   "(fine-tuning), with a new optimizer")
    g = p.add_argument_group("optimization (GPT-3 paper, 125M column)")
    g.add_argument("--batch_size", type=checks.batch_size_arg, default=64, help="micro-batch B per GPU, or 'auto': the "
                   "largest that fits in GPU memory (with AdamW's state and a margin) and divides the total batch")
    g.add_argument("--seq_len", type=int, default=1024, help="sequence length T")
    g.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step (2**19, ~0.5M as in "
                   "GPT-3); reached by gradient accumulation")
    g.add_argument("--max_steps", type=int, default=19073, help="19073 steps x 524288 tokens = 10B tokens, one epoch "
                   "of FineWeb-Edu sample-10BT")
    g.add_argument("--shuffle", action="store_true", help="each epoch, read the train shards and the batches within "
                   "each shard in a new random order (from --seed and the epoch); default: the same order every epoch")
    g.add_argument("--warmup_steps", type=int, default=715, help="375M tokens of linear warmup, as in GPT-3")
    g.add_argument("--max_lr", type=float, default=6e-4)
    g.add_argument("--min_lr", type=float, default=6e-5, help="cosine decay ends here (10%% of max_lr)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="on 2-D parameters (matmul weights, embeddings) "
                   "only")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--loss_chunk_size", type=int, default=None, help="positions per chunk of the training loss, 0 = "
                   "full logits (default: full logits on a GPU where they fit, else chunks of 4096; CPU: 1024)")
    g = p.add_argument_group("faster recipes (docs/recipes.md)")
    fast = ", ".join(f"--{k} {v}" for k, v in RECIPE_PRESETS["fast"].items())
    g.add_argument("--recipe", default="gpt2", choices=sorted(RECIPE_PRESETS),
                   help="a preset of the flags below (and --max_lr ...); flags given explicitly win over it. gpt2: the "
                   f"seed's recipe, i.e. these defaults; fast: {fast}; shakespeare: fast, sized for a CPU (README's "
                   "quickstart: d2, 160 steps of 2048 tokens of input.txt)")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon for the blocks' 2-D "
                   "matrices, AdamW (--max_lr, --embed_lr) for embeddings, head, biases and gains")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "wsd"], help="after warmup: cosine decay to "
                   "--min_lr, or wsd: constant, then linear decay over the last --decay_frac of the steps")
    g.add_argument("--decay_frac", type=float, default=0.2, help="wsd: the fraction of --max_steps spent decaying")
    g.add_argument("--muon_lr", type=float, default=0.02, help="Muon's peak lr (decays to the same fraction of it as "
                   "--min_lr of --max_lr)")
    g.add_argument("--muon_momentum", type=float, default=0.95, help="Muon's (Nesterov) momentum")
    g.add_argument("--muon_weight_decay", type=float, default=0.0, help="Muon's decoupled weight decay")
    g.add_argument("--embed_lr", type=float, default=None, help="with --optimizer muon: AdamW's lr for the embeddings "
                   "and lm_head (default: --max_lr)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--val_every", type=int, default=250, help="val loss every N steps (0 = off)")
    g.add_argument("--val_tokens", type=int, default=20 * 64 * 1024 * 8, help="the val loss is the mean loss over "
                   "the first N tokens of the val split, whatever the batch size and number of GPUs (default: 20 x 64 "
                   "x 1024 x 8, the 8-GPU reproduction's); cut to what the split holds")
    g.add_argument("--val_steps", type=int, default=None, help="deprecated: use --val_tokens; N micro-batches of every "
                   "rank (N x batch_size x seq_len x GPUs tokens)")
    g.add_argument("--hellaswag_every", type=int, default=250, help="HellaSwag acc_norm every N steps (0 = off)")
    g.add_argument("--hellaswag_data", default=None, help="a local HellaSwag jsonl (default: download the val split)")
    g.add_argument("--sample_every", type=int, default=250, help="print samples every N steps (0 = off)")
    g.add_argument("--sample_prompt", default="Hello, I'm a language model,", help="the prompt those samples continue")
    g.add_argument("--log_dir", default="log", help="log.txt and checkpoints go here")
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write the metrics for TensorBoard: event files in DIR (default: --log_dir)")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log the metrics to this Weights & Biases project (any WANDB_MODE, e.g. offline)")
    g.add_argument("--wandb_run", default=None, metavar="NAME", help="the wandb run's name (default: wandb picks one)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_every", type=int, default=5000, help="checkpoint every N steps (0 = only at the end); "
                   "the last step always writes one")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="keep the newest N checkpoints (and any marked with "
                   "a model_XXXXX.pt.keep file)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, help="continue from the newest checkpoint in "
                   "--log_dir that loads (none there: start a new run; a finished run: do nothing), or from PATH")
    g.add_argument("--extend", action="store_true", help="with --resume: train on to a new --max_steps; the LR "
                   "schedule stays the checkpoint's (cosine to its max_steps), the added steps run at --min_lr")
    g.add_argument("--overwrite", action="store_true", help="start a new run in a --log_dir that holds an earlier "
                   "run's checkpoints (deletes them)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast dtype; auto = bfloat16 where the device has it natively, float16 on older GPUs, "
                   "else float32")
    g.add_argument("--compile", type=int, default=1, choices=[0, 1], help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                   "state over the ranks (FSDP2) instead of a full copy per GPU (DDP); for models that do not fit one "
                   "GPU (gpt2-medium to gpt2-xl)")
    g.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("sampling and export (with --init_from; no training)")
    g.add_argument("--sample", default=None, metavar="PROMPT", help="print samples continuing PROMPT and exit")
    g.add_argument("--num_samples", type=int, default=4)
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (1 = greedy, 0 = all)")
    g.add_argument("--export", default=None, metavar="DIR", help="write the --init_from model as a Hugging Face "
                   "directory (GPT-2; --arch modern: NanoChat) with GPT-2's tokenizer, and exit")
    # parsed again with the preset as the defaults: flags given explicitly win over it
    p.set_defaults(**RECIPE_PRESETS[p.parse_args(argv).recipe])
    return p.parse_args(argv)


def sample_or_export(args):
    with common.model_errors_as_usage_errors():
        model = GPT.from_pretrained(args.init_from)
        if args.export:
            model.save_pretrained(args.export)
    if args.export:
        kind = "NanoChat" if model.config.arch == "modern" else "GPT-2"
        print(f"wrote a Hugging Face {kind} model and tokenizer to {args.export} (load them with "
              "AutoModelForCausalLM and AutoTokenizer .from_pretrained)")
    if args.sample is None:
        return
    device = common.pick_device(args.device)
    model.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    dtype = common.pick_dtype(args.dtype, device.split(":")[0])
    texts = sample(model, args.sample, generator, dtype, args.num_samples, args.max_new_tokens, args.temperature,
                   args.top_k or None)
    for text in texts:
        print(f"> {text}")


def main(argv=None):
    args = parse_args(argv)
    ctx = None
    try:
        with common.model_errors_as_usage_errors():  # an unknown --model
            block_size = model_config(args.model).block_size if args.init_from == "scratch" else None
        checks.check_args(args, block_size)
        if args.sample is not None or args.export:
            return sample_or_export(args)
        ctx = common.setup_distributed(args.device)
        train(args, ctx)
    except (UsageError, TrainingDiverged, CheckpointWriteFailed) as e:
        if not isinstance(e, CheckpointWriteFailed) or ctx.master:  # a failed write: one line; other ranks only stop
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    finally:
        if ctx is not None and ctx.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    common.run_script(main)
