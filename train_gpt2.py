"""
Train GPT-2 (124M) from scratch, fine-tune it, sample from it, export it to Hugging Face.

One file, read top to bottom. Importing it runs nothing.

    python train_gpt2.py --data input.txt --model d6 ...        # a small GPT on Tiny Shakespeare, CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # the GPT-2 (124M) reproduction, 8 GPUs
    python train_gpt2.py --init_from gpt2 --sample "Hello, I'm a language model,"

The seed's story (build-nanogpt's), each section using only what comes before it:
    The model          GPTConfig and --model sizes; the blocks of GPT-2 and of the modern arch; the KV cache
    The loss           cross-entropy over the lm_head in chunks, without the full logits
    The model: GPT     init, forward, generate; Hugging Face import and export
    The data           DataLoaderLite (train shards), ValSet (the val loss's tokens)
    Optimization       the LR schedule, AdamW, Muon
    Checkpoints        save, load, find, prune; older checkpoints upgraded
    Training           train_step, evaluation, sampling, checkpointing, train()
Optional machinery, after a banner; the core reaches it only through calls marked "hook:" (most of them in train()):
    launch (devices, process groups), FSDP, batch-size probing and the loss path, hardware (dtype, GPU peak FLOPs),
    progress (step N/M, ETA, run.json), live metrics (TensorBoard, wandb), input checks (flags, files, checkpoints,
    resume), the command line.
"""

import argparse
import contextlib
import copy
import ctypes
import errno
import functools
import glob
import importlib.util
import json
import math
import os
import re
import signal
import sys
import time
import urllib.request
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag

GPT2_EOT = 50256
GPT2_VOCAB = 50257  # real GPT-2 token ids are < 50257; ids above that only pad the embedding table


class UsageError(ValueError):
    """Bad input from the user: main() prints its one-line message instead of a traceback. (The model raises plain
    ValueErrors; where the command line builds, loads or exports one, they become UsageErrors.)"""


class TrainingDiverged(RuntimeError):
    pass


class CheckpointWriteFailed(RuntimeError):
    """Rank 0 could not write a checkpoint: every rank stops at that step; rank 0 says why."""


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


# ---- the modern block (--arch modern)
# The GPT class below builds either OpenAI's GPT-2 or a block with the changes that sped up speedruns since
# (modded-nanogpt): rotary position embeddings instead of the learned wpe, RMSNorm without a gain instead of
# LayerNorm (also on the embedding output, and on q and k per head: QK-norm), ReLU^2 instead of GELU, no biases,
# zero-initialized output projections and lm_head, an lm_head untied from wte, and logits soft-capped with tanh.
# Every matrix of a block stays under transformer.h and the norms have no parameters, so an optimizer can
# group the 2-D block weights (Muon) apart from the embedding and the head.


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


# ---- chunked loss for fp16: the gradient is made in backward, once the loss scale is known


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


# Hugging Face's GPT-2 uses Conv1D modules, which store these Linear weights transposed
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# --arch modern is transformers' NanoChat (new in 5.0): our weights -> theirs ({} is the layer). c_attn, one
# (3C, C) matrix, is their q_proj, k_proj and v_proj stacked; their norms have no weights either
NANOCHAT_WEIGHTS = {
    "transformer.wte.weight": ["model.embed_tokens.weight"],
    "transformer.h.{}.attn.c_attn.weight": [f"model.layers.{{}}.self_attn.{x}_proj.weight" for x in "qkv"],
    "transformer.h.{}.attn.c_proj.weight": ["model.layers.{}.self_attn.o_proj.weight"],
    "transformer.h.{}.mlp.c_fc.weight": ["model.layers.{}.mlp.fc1.weight"],
    "transformer.h.{}.mlp.c_proj.weight": ["model.layers.{}.mlp.fc2.weight"],
    "lm_head.weight": ["lm_head.weight"],
}
NANOCHAT_TRANSFORMERS = "5.0"


def nanochat_classes():
    """(NanoChatConfig, NanoChatForCausalLM), or a ValueError naming the transformers release that has them."""
    import transformers

    try:
        from transformers import NanoChatConfig, NanoChatForCausalLM
    except ImportError:
        raise ValueError(f"--arch modern models are Hugging Face NanoChat models, which need transformers >= "
                         f"{NANOCHAT_TRANSFORMERS} (installed: {transformers.__version__}): pip install -U "
                         f"'transformers>={NANOCHAT_TRANSFORMERS}'") from None
    return NanoChatConfig, NanoChatForCausalLM


def nanochat_config(c):
    """NanoChatConfig's arguments for our config c (--arch modern); a padded vocab is cut to GPT-2's tokens."""
    return dict(
        vocab_size=min(c.vocab_size, GPT2_VOCAB), hidden_size=c.n_embd, intermediate_size=4 * c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        max_position_embeddings=c.block_size, hidden_act="relu2", attention_bias=False,
        # nn.RMSNorm and F.rms_norm default to the dtype's eps: float32's, as we compute them
        rms_norm_eps=torch.finfo(torch.float32).eps, rope_parameters=dict(rope_type="default", rope_theta=ROTARY_BASE),
        final_logit_softcapping=LOGIT_SOFTCAP, tie_word_embeddings=False,
        bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, pad_token_id=None,  # no pad row: the embedding trains whole
    )


def flip_rotary(c_attn, n_head):
    """c_attn's weight with the second half of every q and k head negated. NanoChat's rotate_half is [x2, -x1],
    apply_rotary's [-x2, x1]: they turn each pair opposite ways. Given (x1, -x2), NanoChat's rotation is ours with
    the second half negated, in q and k alike, so every q.k is unchanged (so is the QK-norm: it ignores signs).
    Its own inverse: it converts both ways."""
    w = c_attn.reshape(3, n_head, 2, -1, c_attn.size(-1)).clone()
    w[:2, :, 1] *= -1
    return w.view_as(c_attn)


def nanochat_names(n_layer):
    """(our weight's name, their names) for every weight."""
    for ours, theirs in NANOCHAT_WEIGHTS.items():
        for i in range(n_layer) if "{}" in ours else [None]:
            yield ours.format(i), [t.format(i) for t in theirs]


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE, which it downloads on first use into its cache (TIKTOKEN_CACHE_DIR)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # requests' errors are OSErrors
        raise UsageError(f"cannot download the GPT-2 tokenizer ({type(e).__name__}); connect to the internet once "
                         "(tiktoken caches it), or set TIKTOKEN_CACHE_DIR to a cache that has it") from None


def save_gpt2_tokenizer(directory, model_max_length=1024):
    """tokenizer.json + tokenizer_config.json for GPT-2's BPE, converted from tiktoken's (no download)."""
    from transformers import GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = gpt2_tokenizer()
    converter = TikTokenConverter(pattern=enc._pat_str, extra_special_tokens=enc._special_tokens)
    # the BPE ranks from memory, not from a file: tiktoken keeps a copy of every file it reads in its cache
    # (TIKTOKEN_CACHE_DIR), under a hash of the path, which a temporary file makes new each time
    converter.load_tiktoken_bpe = lambda _: enc._mergeable_ranks
    eot = enc.decode([GPT2_EOT])
    hf = GPT2TokenizerFast(tokenizer_object=converter.converted(), bos_token=eot, eos_token=eot, unk_token=eot,
                           model_max_length=model_max_length)
    hf.save_pretrained(directory)


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
            if os.path.isdir(name_or_path):
                # hook: input checks (a GPT-2 or NanoChat config and weights)
                if check_hf_dir(name_or_path, accepted) == "nanochat":
                    return cls._from_nanochat(name_or_path)
            return cls._from_hf(name_or_path)
        if os.path.isfile(name_or_path):
            # load_checkpoint (Checkpoints, below) checks that the weights fit the config
            checkpoint = load_checkpoint(name_or_path)
            model = cls(GPTConfig(**checkpoint["config"]))
            model.load_state_dict(checkpoint["model"])
            return model
        if name_or_path.endswith(".pt") or os.sep in name_or_path:
            raise ValueError(f"{name_or_path}: no such file or directory; check the path ({accepted})")
        raise ValueError(f"unknown model {name_or_path!r}: {accepted}")

    @classmethod
    def _from_hf(cls, name_or_path):
        from transformers import GPT2LMHeadModel

        try:
            hf, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        except Exception as e:  # no network, damaged weights, tensors of the wrong shape, ...
            msg = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"{name_or_path}: could not load it as GPT-2 with transformers ({type(e).__name__}: "
                             f"{msg}); pass a Hugging Face GPT-2 model") from None
        # transformers fills weights missing from the file with random ones and only warns: a model missing
        # any weight is not the model the user meant (the causal-mask buffers are not weights)
        missing = [k for k in info.get("missing_keys", []) if not k.endswith((".attn.bias", ".attn.masked_bias"))]
        if missing:
            raise ValueError(f"{name_or_path}: its weights lack {len(missing)} of GPT-2's tensors "
                             f"({', '.join(missing[:3])}...); pass a complete Hugging Face GPT-2 model")
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd)
        model = cls(config)
        sd_hf = hf.state_dict()
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in sd.items():
                src = sd_hf[k]
                if k.endswith(CONV1D_WEIGHTS):
                    src = src.t()
                v.copy_(src)
        return model

    @classmethod
    def _from_nanochat(cls, path):
        """An --arch modern GPT from a NanoChat directory whose architecture is ours (check_nanochat_config)."""
        NanoChatConfig, NanoChatForCausalLM = nanochat_classes()

        def unloadable(e):  # a config transformers refuses, damaged weights, tensors of the wrong shape, ...
            msg = (str(e).strip().splitlines() or [""])[0]
            return ValueError(f"{path}: could not load it as NanoChat with transformers ({type(e).__name__}: {msg}); "
                              "pass a Hugging Face NanoChat model")

        try:
            c = NanoChatConfig.from_pretrained(path)
        except Exception as e:
            raise unloadable(e) from None
        config = GPTConfig(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                           n_head=c.num_attention_heads, n_embd=c.hidden_size, arch="modern")
        check_nanochat_config(path, c, nanochat_config(config))  # hook: input checks (an architecture we have)
        try:
            hf, info = NanoChatForCausalLM.from_pretrained(path, config=c, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)  # said below, in one line
        except Exception as e:
            raise unloadable(e) from None
        # weights missing from the file or of another shape: transformers fills them with random ones and warns
        bad = sorted(set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())})
        if bad:
            raise ValueError(f"{path}: its weights lack {len(bad)} of NanoChat's tensors or have another shape "
                             f"({', '.join(bad[:3])}); pass a complete Hugging Face NanoChat model of that config")
        model = cls(config)
        sd_hf = hf.state_dict()  # a tied lm_head (tie_word_embeddings) is there too, as a copy of the embedding
        sd = {ours: torch.cat([sd_hf[t] for t in theirs]) for ours, theirs in nanochat_names(config.n_layer)}
        for k in sd:
            if k.endswith("c_attn.weight"):
                sd[k] = flip_rotary(sd[k], config.n_head)
        model.load_state_dict(sd)
        return model

    def save_pretrained(self, directory, tokenizer=True):
        """Write a Hugging Face directory (config.json + model.safetensors) that AutoModelForCausalLM.from_pretrained
        loads: GPT-2 (GPT2LMHeadModel) or, for --arch modern, NanoChat (NanoChatForCausalLM, transformers >= 5.0).
        A padded vocab is cut back to the 50257 real tokens (the soft-cap is per logit: the rest are unchanged).
        tokenizer: also write GPT-2's tokenizer, so pipeline() and lm-eval-harness need nothing else."""
        c = self.config
        if c.arch == "modern":
            hf = self._to_nanochat()
            hf.save_pretrained(directory)
            if tokenizer:
                save_gpt2_tokenizer(directory, model_max_length=c.block_size)
            return
        from transformers import GPT2Config, GPT2LMHeadModel

        vocab = min(c.vocab_size, GPT2_VOCAB)
        hf_config = GPT2Config(
            vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, tie_word_embeddings=True,
        )
        sd = {}
        for k, v in self.state_dict().items():
            v = v.detach().float().cpu()
            if k.endswith(CONV1D_WEIGHTS):
                v = v.t()
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:vocab]
            sd[k] = v.contiguous()
        hf = GPT2LMHeadModel(hf_config)
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        buffers = all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing)  # not weights
        assert not unexpected and buffers, (missing, unexpected)
        hf.save_pretrained(directory)
        if tokenizer:
            save_gpt2_tokenizer(directory, model_max_length=c.block_size)

    def _to_nanochat(self):
        """transformers' NanoChatForCausalLM with this --arch modern model's weights (float32, vocab cut to GPT-2's)."""
        NanoChatConfig, NanoChatForCausalLM = nanochat_classes()
        c = self.config
        ours = {k: v.detach().float().cpu() for k, v in self.state_dict().items()}
        sd = {}
        for name, theirs in nanochat_names(c.n_layer):
            v = ours[name][:GPT2_VOCAB] if name in ("transformer.wte.weight", "lm_head.weight") else ours[name]
            if name.endswith("c_attn.weight"):
                v = flip_rotary(v, c.n_head)
            sd.update({t: part.contiguous() for t, part in zip(theirs, v.chunk(len(theirs)))})
        hf = NanoChatForCausalLM(NanoChatConfig(**nanochat_config(c)))
        hf.load_state_dict(sd)  # strict: every weight of theirs is one of ours
        return hf


# -----------------------------------------------------------------------------
# The data


@functools.lru_cache(maxsize=2)
def tokenize_text_file(path):
    """A .txt file as GPT-2 tokens: the first 90% is the train split, the last 10% the val split."""
    text = read_text_file(path)  # hook: input checks (UTF-8, not empty)
    tokens = np.array(gpt2_tokenizer().encode_ordinary(text), dtype=np.uint16)
    n_val = len(tokens) // 10
    return {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}


def find_shards(data_root, split):
    """The token arrays of a split: .npy shards (memory-mapped) in a directory, or a .txt file tokenized now."""
    if str(data_root).endswith(".txt"):
        if not os.path.exists(data_root):
            raise UsageError(f"{data_root}: no such file; check the path (input.txt is part of the repository)")
        return [tokenize_text_file(str(data_root))[split]]
    if os.path.isfile(data_root):
        raise UsageError(f"{data_root}: a file, but --data takes a directory of .npy token shards or a .txt file; "
                         f"tokenize it with `python fineweb.py --local_files {data_root}` and pass that --out_dir")
    if not os.path.isdir(data_root):
        raise UsageError(f"data directory {data_root} does not exist: run `python fineweb.py` to make the FineWeb-Edu "
                         "shards, or pass --data input.txt for a small run")
    paths = sorted(glob.glob(os.path.join(data_root, f"*{split}*.npy")))
    if not paths:
        raise UsageError(f"no {split} shards (*{split}*.npy) in {data_root}: run `python fineweb.py` to make them")
    return [check_shard(p) for p in paths]  # hook: input checks (memory-mapped, uint16 GPT-2 ids)


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
        self._fds = {}  # shard -> file descriptor, for _prefetch
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

    def _prefetch(self, shard, position):
        """Have the OS start reading the next window from disk while the GPU computes: random windows defeat its
        readahead, and a cold 128 KiB read costs ~0.5 ms, near 1% of a GPU step."""
        data = self.shards[shard]
        if not isinstance(data, np.memmap) or not hasattr(os, "posix_fadvise"):
            return
        if shard not in self._fds:
            self._fds[shard] = os.open(data.filename, os.O_RDONLY)
        start = data.offset + position * data.itemsize
        os.posix_fadvise(self._fds[shard], start, (self.B * self.T + 1) * data.itemsize, os.POSIX_FADV_WILLNEED)

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

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
                self._prefetch(int(self._plan[1][self.index]), int(self._plan[2][self.index]))
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
# Checkpoints


# A checkpoint is a dict of tensors, numbers, strings and lists only (no pickled classes), so that it loads with
# torch.load(weights_only=True): a checkpoint from the internet cannot run code. It holds everything a run needs
# to continue exactly: model, optimizer, config, flags, step, data positions of every rank and the RNG states.


CHECKPOINT_RE = re.compile(r"model_(\d+)\.pt$")


def upgrade_checkpoint(checkpoint):
    """Fill in what older checkpoints lack, with what they meant: no config "arch" (before --arch): gpt2; no
    "lr_decay_steps" (before --extend): their max_steps; no "precision": float16 if GradScaler was on (else it stays
    unknown: bfloat16 or float32). (No "shard_tokens" in a loader state: the loader skips that check.)"""
    if isinstance(checkpoint.get("config"), dict):
        checkpoint["config"].setdefault("arch", "gpt2")
    saved = checkpoint.get("args")
    if isinstance(saved, dict):
        if "max_steps" in saved:
            saved.setdefault("lr_decay_steps", saved["max_steps"])
        if "precision" not in saved and checkpoint.get("scaler"):
            saved["precision"] = "float16"
    return checkpoint


def load_checkpoint(path, resume=False):
    """A checkpoint of ours, checked inside too (config, weights, and with resume the training state), so that a
    foreign or damaged one is a one-line error here, not a traceback from load_state_dict later."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; check the path (checkpoints are {{log_dir}}/model_XXXXX.pt)")
    try:
        # memory-mapped: the pages of the file, shared by the ranks of a node and read only where used
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a zip, truncated, or holds pickled objects
        raise UsageError(f"{path} is not a checkpoint written by train_gpt2.py ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "step"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a checkpoint written by train_gpt2.py (expected a dict with model, config and "
                         "step)")
    upgrade_checkpoint(checkpoint)
    model = check_checkpoint_model(checkpoint, path)  # hook: input checks (config and weights fit)
    if resume:
        check_checkpoint_state(checkpoint, path, model)  # hook: input checks (optimizer, data, RNG states)
    return checkpoint


def os_error_in(e):
    """The OSError behind e, if any: torch.save reports a failed write as a RuntimeError whose __context__ is it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def save_checkpoint(checkpoint, path):
    """Write atomically: a crash mid-write leaves the previous checkpoints intact and no half-written model_*.pt;
    a write that fails (disk full, file-size limit, I/O error) leaves no temporary file either."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if os_error_in(e) is not None:  # a failed write; an abort (second Ctrl-C) leaves it, as a killed writer would
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def list_checkpoints(log_dir):
    """(step, path) of the checkpoints in log_dir, newest first."""
    found = []
    for path in glob.glob(os.path.join(log_dir, "model_*.pt")):
        m = CHECKPOINT_RE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def prune_checkpoints(log_dir, keep):
    """Keep the newest `keep` checkpoints, and any the user marked by creating model_XXXXX.pt.keep beside it.
    Returns "path (reason)" for each one it could not delete."""
    failed = []
    for _, path in list_checkpoints(log_dir)[keep:]:
        if not os.path.exists(path + ".keep"):
            try:
                os.remove(path)
            except OSError as e:
                failed.append(f"{path} ({e.strerror or e})")
    return failed


def find_resume_checkpoint(log_dir):
    """(path, checkpoint) of the newest checkpoint in log_dir that loads, damaged ones reported and skipped; or
    (None, None) when log_dir holds none: the first start of a job that every restart runs again as it is."""
    found = list_checkpoints(log_dir)
    for _, path in found:
        try:
            return path, load_checkpoint(path, resume=True)
        except UsageError as e:
            print(f"skipping {path}: {e}")
    if found:
        raise UsageError(f"--resume: none of the {len(found)} checkpoints in {log_dir} loads; pass --resume PATH to "
                         "one that does, or start over there with --overwrite instead of --resume")
    return None, None


def get_rng_state(generator):
    state = {"torch": torch.get_rng_state(), "sample": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    # a CUDA generator's state is 16 bytes, a CPU one's 5056: a checkpoint from the other device type keeps the
    # sampling generator as seeded (the training losses do not depend on it)
    if state["sample"].numel() == generator.get_state().numel():
        generator.set_state(state["sample"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# the streams a step writes after training (its evaluations come before, and before its checkpoint)
STEP_STREAMS = ("train", "lr", "norm", "epoch")


def truncate_log(log_file, step):
    """On resume: keep the log's lines from before the checkpoint's step and its evaluations at that step
    (written before the checkpoint); drop what the interrupted run logged after it."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        s, stream = int(parts[0]), parts[1]
        if s < step or (s == step and stream not in STEP_STREAMS):
            kept.append(line)
    with open(log_file + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(log_file + ".tmp", log_file)


def lr_decay_steps(args, checkpoint):
    """Where the cosine ends: --max_steps, or for a resumed run the checkpoint's, which --extend keeps."""
    return args.max_steps if checkpoint is None else checkpoint["args"]["lr_decay_steps"]


# -----------------------------------------------------------------------------
# Training


def autocast_context(device_type, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


@dataclass
class DistContext:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):  # cuda, cpu or mps: what autocast and the fused kernels ask for
        return self.device.split(":")[0]


def all_reduce_mean(value, ctx):
    """The mean of a scalar tensor over ranks (gloo has no AVG, so SUM / world_size)."""
    if ctx.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / ctx.world_size
    return value


def gather_objects(obj, ctx):
    if not ctx.ddp:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def agreed(value, ctx, op):
    """A number agreed over the ranks (op: MIN or MAX; a collective: every rank calls it); as is in one process."""
    if not ctx.ddp:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=op)
    return t.item()


def any_rank(flag, ctx):
    """True on every rank if flag is True on any."""
    return bool(agreed(flag, ctx, dist.ReduceOp.MAX))


class StopSignal:
    """SIGTERM (what a cluster sends before preemption), SIGUSR1 (SLURM's --signal=USR1@120 before the time limit)
    or Ctrl-C: finish the step, checkpoint, exit. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint", flush=True)

    def agreed(self, ctx):
        """True on every rank if any rank was signalled, so that all ranks stop at the same step."""
        return any_rank(self.requested, ctx)


# ---- model and optimizer state across ranks: a full copy on each (DDP) or shards (FSDP, below)


def is_sharded(model):
    return hasattr(model, "set_requires_gradient_sync")  # an FSDPModule; no import needed for the plain model


def local_part(t):
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def gradient_sync(train_model, sync):
    """Context for one micro-step's backward: reduce gradients over ranks (sync) or only accumulate them locally.
    DDP: no_sync(). FSDP: no reduce-scatter until the last micro-step; meanwhile each rank accumulates unsharded
    gradients of the whole model (a full gradient's memory, traded for world_size times less traffic)."""
    if is_sharded(train_model):
        train_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else train_model.no_sync()


def params_finite(model, ctx):
    """Whether all parameters are finite; under FSDP each rank checks its shards and all ranks agree."""
    ok = torch.stack([local_part(p).isfinite().all() for p in model.parameters()]).all().float()
    if is_sharded(model):
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


@dataclass
class Run:
    """A training run's state besides its flags: what train() decides at start (checkpoints save it with the
    flags, see flags()) and the objects its steps share. train() never writes into args."""

    args: argparse.Namespace
    ctx: DistContext
    dtype: torch.dtype = torch.float32  # the autocast dtype (float32 under FSDP, which casts the weights itself)
    precision: str = "float32"  # the dtype the run trains in: a resumed run must train in the same
    batch_size: int = None  # the micro-batch: --batch_size, what 'auto' chose, or the resumed run's
    lr_decay_steps: int = None  # where the schedule ends: --max_steps, or a resumed run's (which --extend keeps)
    accum_steps: int = 1
    model: nn.Module = None  # the plain model: sampling, HellaSwag and checkpoints use it
    train_model: nn.Module = None  # the one training runs: compiled, in DDP, or sharded (FSDP)
    optimizer: object = None
    scaler: torch.amp.GradScaler = None
    train_loader: object = None  # anything with next_batch(), state_dict() and load_state_dict()
    val_set: object = None
    sample_generator: torch.Generator = None
    log_file: str = None
    metrics: object = None  # TensorBoard and wandb (Metrics, in the optional machinery)
    peak_flops: float = None  # the GPUs' summed tensor-core peak FLOP/s, for the MFU (None: not known)

    def flags(self):
        """The flags as checkpoints save them ("args"), with the run's precision, micro-batch and schedule end."""
        decided = dict(precision=self.precision, batch_size=self.batch_size, lr_decay_steps=self.lr_decay_steps)
        return {**vars(self.args), **decided}


# ---- setup: each function below prepares one thing train() needs


def grad_accum_steps(total_batch_size, B, T, world_size):
    """Micro-steps per optimizer step: total_batch_size tokens in micro-batches of B x T on each rank."""
    tokens_per_micro_step = B * T * world_size
    if total_batch_size % tokens_per_micro_step:
        raise UsageError(f"--total_batch_size {total_batch_size} is not a multiple of batch_size*seq_len*world_size = "
                         f"{B}*{T}*{world_size} = {tokens_per_micro_step}")
    return total_batch_size // tokens_per_micro_step


def check_seq_len(T, config):
    if T > config.block_size:
        raise UsageError(f"--seq_len {T} is longer than the model's block_size {config.block_size}")


@contextlib.contextmanager
def model_errors_as_usage_errors():
    """The model raises plain ValueErrors (an unknown --model, a bad --init_from, an arch that does not export):
    around the calls that build, load or export it for the command line, they are the user's input errors."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


def new_model(run):
    """The model of a new run: from scratch, or --init_from's weights."""
    args = run.args
    run.lr_decay_steps = lr_decay_steps(args, None)
    with model_errors_as_usage_errors():
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
        if list_checkpoints(args.log_dir) and not args.overwrite:
            raise UsageError(f"{args.log_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                             "--overwrite to start over there, or choose another --log_dir")
        return new_model(run), None
    if args.resume == "auto":
        path, checkpoint = find_resume_checkpoint(args.log_dir)
        if checkpoint is None:  # so that the first start and every restart can be the same command
            if args.extend:
                raise UsageError(f"--extend: {args.log_dir} holds no checkpoint to train on from; pass the run's "
                                 "--log_dir, or drop --extend to start a new run")
            if run.ctx.master:
                print(f"--resume: no checkpoint in {args.log_dir}, starting a new run there")
            return new_model(run), None
    else:
        path, checkpoint = args.resume, load_checkpoint(args.resume, resume=True)
    if args.batch_size == "auto":  # the micro-batch the run chose
        run.batch_size = checkpoint["args"]["batch_size"]
    check_resume_compatible(checkpoint, run.flags(), run.ctx.world_size)  # hook: input checks
    run.lr_decay_steps = lr_decay_steps(args, checkpoint)
    checkpoint["path"] = path
    with torch.device(run.ctx.device):  # built where it trains: no CPU copy of the model on each rank
        model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


def make_loaders(args, ctx, B):
    """The train loader, and the val set (None when --val_every is 0); says how many epochs the run is."""
    say = print if ctx.master else (lambda *a, **k: None)
    T = args.seq_len
    train_loader = DataLoaderLite(B, T, ctx.rank, ctx.world_size, "train", args.data, shuffle=args.shuffle,
                                  seed=args.seed)
    epoch_tokens = train_loader.epoch_tokens()
    epochs = args.max_steps * args.total_batch_size / epoch_tokens
    say(f"train data: {epoch_tokens:,} tokens an epoch ({'shuffled' if args.shuffle else 'in order'}); "
        f"{args.max_steps} steps x {args.total_batch_size:,} tokens = {epochs:.3g} epochs")
    if epochs > 1:
        say(f"warning: this run reads its train data {epochs:.3g} times over (log.txt marks each new epoch with `STEP "
            "epoch N`)")
    if not args.val_every:
        return train_loader, None
    val_tokens = args.val_tokens
    if args.val_steps is not None:
        val_tokens = args.val_steps * B * T * ctx.world_size
        say(f"--val_steps is deprecated: --val_steps {args.val_steps} here means --val_tokens {val_tokens} "
            f"({args.val_steps} x {B} x {T} x {ctx.world_size} ranks); use --val_tokens")
    val_set = ValSet(B, T, ctx.rank, ctx.world_size, args.data, val_tokens)
    if val_set.n_tokens != val_tokens:
        say(f"note: --val_tokens {val_tokens} cut to {val_set.n_tokens}, whole windows of {T} that the val split "
            f"({val_set.split_tokens:,} tokens) holds")
    say(f"val loss: the mean over the first {val_set.n_tokens:,} tokens of the val split ({val_set.n_windows} windows "
        f"of {T})")
    return train_loader, val_set


def wrap_model(model, args, ctx):
    """The model that runs the training (and val) forward passes: compiled, and under torchrun wrapped in DDP,
    which averages the gradients over ranks during backward. Everything else uses the plain model."""
    wrapped = torch.compile(model) if args.compile else model
    if ctx.ddp:
        wrapped = DDP(wrapped, device_ids=[ctx.local_rank] if ctx.device_type == "cuda" else None)
    return wrapped


def start_or_resume(run, checkpoint):
    """(start step, last val loss): the checkpoint's, with the optimizer, data and RNG states restored;
    or step 0 with a fresh log (and the earlier run's checkpoints deleted if --overwrite)."""
    args, ctx = run.args, run.ctx
    if checkpoint is None:
        if ctx.master:
            # an old checkpoint left behind would be the one a later --resume picks: stop instead
            failed = prune_checkpoints(args.log_dir, keep=0) if args.overwrite else []
            if failed:
                raise UsageError(f"--overwrite: cannot delete {failed[0]}; delete it or use another --log_dir")
            open(run.log_file, "w").close()
        return 0, None
    load_optimizer_state(run.model, run.optimizer, checkpoint["optimizer"])  # hook: FSDP (or a plain load)
    run.scaler.load_state_dict(checkpoint.get("scaler", {}))
    run.train_loader.load_state_dict(checkpoint["train_loader"][ctx.rank])
    set_rng_state(checkpoint["rng"][ctx.rank], run.sample_generator)
    if ctx.master:
        truncate_log(run.log_file, checkpoint["step"])
        print(f"resuming from {checkpoint['path']} at step {checkpoint['step']}")
        if checkpoint["args"].get("data") != args.data:
            print(f"the data moved ({checkpoint['args'].get('data')} -> {args.data}); its shards are the checkpoint's")
    return checkpoint["step"], checkpoint.get("val_loss")


# ---- evaluation and sampling


@torch.no_grad()
def evaluate_val(model, val_set, ctx, dtype):
    """The mean loss per token over the val set: summed losses and token counts of all ranks, so that it does not
    depend on the micro-batch or the number of ranks (each rank runs the same number of forward passes)."""
    model.eval()
    acc = torch.float32 if ctx.device_type == "mps" else torch.float64  # MPS has no float64
    total = torch.zeros(2, dtype=acc, device=ctx.device)  # summed loss, tokens
    for x, y, n in val_set.batches():
        x, y = x.to(ctx.device), y.to(ctx.device)
        with autocast_context(ctx.device_type, dtype):
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
    enc = gpt2_tokenizer()
    model.eval()
    device = next(model.parameters()).device
    tokens = enc.encode(prompt) or [GPT2_EOT]
    idx = torch.tensor(tokens, dtype=torch.long, device=device).repeat(num_samples, 1)
    with autocast_context(device.type, dtype):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [enc.decode(row.tolist()) for row in out]


# ---- one optimization step


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
        sync = not ctx.ddp or micro_step == run.accum_steps - 1
        with gradient_sync(train_model, sync):
            with autocast_context(ctx.device_type, run.dtype):
                loss = train_model(x, y)[1]  # the full-logits path's logits: freed now, not kept through backward
            # each micro-batch's loss is a mean over its tokens; dividing by the number of micro-steps makes
            # the summed gradients those of the mean over the whole batch, not a sum of means
            loss = loss / run.accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    loss_accum = all_reduce_mean(loss_accum, ctx)
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


# ---- the loop


def log_line(ctx, log_file, line):
    if ctx.master:
        with open(log_file, "a") as f:
            f.write(line + "\n")


WRITE_FIXES = {
    errno.ENOSPC: "make room on that disk", errno.EDQUOT: "make room in your disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f)", errno.EACCES: "make the directory writable",
    errno.EPERM: "make the directory writable", errno.EROFS: "use a writable --log_dir",
}


def try_save_checkpoint(checkpoint, path, step):
    """None, or the one-line error for a checkpoint that could not be written (disk full, file-size limit, I/O
    error, permissions); the previous checkpoints are left as they are."""
    try:
        save_checkpoint(checkpoint, path)
    except (OSError, RuntimeError) as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        fix = WRITE_FIXES.get(cause.errno, "check that disk")
        done = list_checkpoints(os.path.dirname(path))
        since = f"the last checkpoint, {os.path.basename(done[0][1])}" if done else "the start (no checkpoint yet)"
        return (f"{path}: cannot write the checkpoint of step {step} ({cause.strerror or cause}); {fix}, then run "
                f"the same command with --resume: it continues from {since}")
    return None


def write_checkpoint(run, step, val_loss):
    """Called on every rank (the data positions and RNG states of all ranks are gathered); rank 0 writes."""
    model, ctx, log_dir = run.model, run.ctx, run.args.log_dir
    if not params_finite(model, ctx):
        raise TrainingDiverged(f"step {step}: the parameters hold NaN or inf; not writing a checkpoint. Lower "
                               f"--max_lr or resume from the last checkpoint in {log_dir}")
    loader_states = gather_objects(run.train_loader.state_dict(), ctx)
    rng_states = gather_objects(get_rng_state(run.sample_generator), ctx)
    model_state, optimizer_state = full_state_dicts(model, run.optimizer, ctx)  # hook: FSDP (gathered on rank 0)
    error = None
    if ctx.master:
        checkpoint = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": run.scaler.state_dict(),
            "config": asdict(model.config),
            "args": run.flags(),
            "step": step,
            "val_loss": val_loss,
            "world_size": ctx.world_size,
            "train_loader": loader_states,
            "rng": rng_states,
            "metrics": run.metrics.state(),  # hook: live metrics (the wandb run to continue)
        }
        path = os.path.join(log_dir, f"model_{step:05d}.pt")
        error = try_save_checkpoint(checkpoint, path, step)
        if error is None:
            print(f"saved {path}")
            for failed in prune_checkpoints(log_dir, run.args.keep_checkpoints):  # the new one is safe: go on
                print(f"warning: cannot delete the old checkpoint {failed}; delete it by hand")
    # also the barrier after the write: nobody moves on before the file is complete, or waits for a rank 0 that stopped
    if any_rank(error is not None, ctx):
        raise CheckpointWriteFailed(error or "rank 0 could not write a checkpoint")


def run_evals(run, step, log):
    """The evaluations due at this step: val loss (returned, else None), HellaSwag, samples."""
    args, ctx, model, last_step = run.args, run.ctx, run.model, step == run.args.max_steps
    say = print if ctx.master else (lambda *a, **k: None)
    val_loss = None
    if args.val_every and (step % args.val_every == 0 or last_step):
        val_loss = evaluate_val(run.train_model, run.val_set, ctx, run.dtype)
        say(f"validation loss: {val_loss:.4f}")
        log(f"{step} val {val_loss:.4f}")
        run.metrics.log_eval(step, "val", val_loss)  # hook: live metrics
    if args.hellaswag_every and (step % args.hellaswag_every == 0 or last_step):
        model.eval()
        # under FSDP each forward needs every rank: all ranks score all examples, in step
        rank, world_size = (0, 1) if args.fsdp else (ctx.rank, ctx.world_size)
        n_correct, n_correct_norm, n_total = hellaswag.evaluate(
            model, ctx.device, data=args.hellaswag_data, rank=rank, world_size=world_size,
            autocast_dtype=None if run.dtype == torch.float32 else run.dtype,
        )
        say(f"HellaSwag accuracy: {n_correct_norm}/{n_total}={n_correct_norm / n_total:.4f}")
        log(f"{step} hella {n_correct_norm / n_total:.4f}")
        run.metrics.log_eval(step, "hella", n_correct_norm / n_total)  # hook: live metrics
    # under FSDP every rank runs the sampling forward passes (each all-gathers the weights); rank 0 prints
    due = args.sample_every and ((step > 0 and step % args.sample_every == 0) or last_step)
    if (ctx.master or args.fsdp) and due:
        texts = sample(model, args.sample_prompt, run.sample_generator, run.dtype)
        for i, text in enumerate(texts):
            say(f"sample {i}: {text}")
        run.metrics.log_text(step, "samples", texts)  # hook: live metrics
    return val_loss


def train_loop(run, start_step, val_loss):
    """Steps start_step .. --max_steps, each with its due evaluations and checkpoint before its training step; stops
    early, with a checkpoint, on a stop signal. val_loss: the latest, saved with the checkpoints."""
    args, ctx = run.args, run.ctx
    say = print if ctx.master else (lambda *a, **k: None)
    log = functools.partial(log_line, ctx, run.log_file)
    flops_per_step = flops_per_token(run.model.config, args.seq_len) * args.total_batch_size  # hook: hardware (MFU)
    timer = StepTimer()  # hook: progress (the step lines' eta)
    stop = StopSignal()
    stop.install()
    try:
        evals_done_at = start_step if start_step else -1  # a checkpoint is written after its step's evaluations
        for step in range(start_step, args.max_steps + 1):
            last_step = step == args.max_steps
            if step != evals_done_at:
                now = run_evals(run, step, log)
                val_loss = val_loss if now is None else now  # None: no val loss at this step

            stopping = stop.agreed(ctx)
            due = last_step or stopping or (args.checkpoint_every and step % args.checkpoint_every == 0)
            if step > start_step and due:
                write_checkpoint(run, step, val_loss)
                run.metrics.flush()  # hook: live metrics
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
            mfu = f" | mfu {100 * flops_per_step / dt / run.peak_flops:.1f}%" if run.peak_flops else ""
            say(f"step {step:5d}/{args.max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt "
                f"{dt * 1000:.1f}ms | tok/sec {args.total_batch_size / dt:.0f}{mfu} | eta "
                f"{timer.eta(args.max_steps - step - 1)}")
            if run.train_loader.epoch != epoch:  # (rank 0's data) this step began a new pass over the train data
                new_epoch = run.train_loader.epoch + 1
                say(f"step {step}: epoch {new_epoch} of the train data begins; the data repeats from here")
                log(f"{step} epoch {new_epoch}")
            if step == start_step:  # the optimizer state exists after the first step
                say(state_memory_line(run.model, run.optimizer, ctx))  # hook: FSDP (state bytes per rank)
            log(f"{step} train {loss:.6f}\n{step} lr {lr:.6e}\n{step} norm {norm:.6f}")  # one write, one step
            run.metrics.log_step(step, loss, norm, dt)  # hook: live metrics
    finally:
        stop.restore()
        if run.metrics:
            run.metrics.close()  # hook: live metrics


def train(args, ctx):
    """The training run: a new one or a resumed one set up here (model, data, optimizer), then train_loop. The
    optional machinery is reached through the calls marked "hook:"."""
    say = print if ctx.master else (lambda *a, **k: None)
    run = Run(args, ctx, batch_size=None if args.batch_size == "auto" else args.batch_size)
    run.dtype = setup_device(args, ctx)  # hook: hardware (dtype for the device, TF32, CPU allocator, seeds)
    run.precision = str(run.dtype).replace("torch.", "")
    if args.data.endswith(".txt"):
        if ctx.master:
            ensure_text_data(args.data)  # hook: input checks (downloads Tiny Shakespeare on first use)
        if ctx.ddp:
            dist.barrier()
    if args.sample_every or args.hellaswag_every:
        gpt2_tokenizer()  # offline without tiktoken's cache: one line now, not a traceback at the first sample
    os.makedirs(args.log_dir, exist_ok=True)
    model, checkpoint = load_or_build_model(run)
    if checkpoint is not None and checkpoint["step"] >= args.max_steps:  # schedulers run finished jobs again
        say(f"{checkpoint['path']}: the run already reached --max_steps {args.max_steps}; nothing to do "
            "(--extend --max_steps N trains on)")
        return
    config = model.config
    check_seq_len(args.seq_len, config)
    run.model = model.to(ctx.device)
    if args.fsdp:  # hook: FSDP, before --batch_size auto, which probes the shards. run.dtype is float32 then: FSDP
        run.train_model, run.dtype = shard_model(model, ctx, run.dtype)  # casts to bf16 itself
    if run.batch_size is None:
        run.batch_size = choose_batch_size(args, model, ctx, run.dtype)  # hook: batch-size probing
        say(f"--batch_size auto: micro-batch {run.batch_size}")
    B, T = run.batch_size, args.seq_len
    run.accum_steps = grad_accum_steps(args.total_batch_size, B, T, ctx.world_size)
    model.loss_chunk_size = training_loss_chunk_size(model, ctx, B, T, head_is_fused(args, model))  # hook: loss path
    run.train_loader, run.val_set = make_loaders(args, ctx, B)
    if args.hellaswag_every:  # download and tokenize now: a bad file should fail at start, not hours in
        try:
            hellaswag.load_examples(data=args.hellaswag_data)
        except (OSError, ValueError) as e:
            raise UsageError(f"--hellaswag_data: {e}") from None

    if args.fsdp:
        if args.compile:
            compile_blocks(model)  # hook: FSDP
    else:
        run.train_model = wrap_model(model, args, ctx)
    # Newton-Schulz in bf16 only where the run's matmuls are bf16: emulated (a CPU without AVX512-BF16/AMX, an fp16
    # GPU) it took 5.7 s of a 15 s step of the CPU quickstart, fp32 0.2 s
    ns_dtype = torch.bfloat16 if run.precision == "bfloat16" else torch.float32
    run.optimizer = make_optimizer(model, args, ctx.device_type, ns_dtype)
    # fp16 overflows where bf16 does not: scale the loss up so small gradients survive, and skip steps that overflow
    run.scaler = torch.amp.GradScaler(ctx.device_type, enabled=run.dtype == torch.float16)
    run.sample_generator = torch.Generator(device=ctx.device).manual_seed(42 + ctx.rank)
    run.log_file = os.path.join(args.log_dir, "log.txt")
    start_step, val_loss = start_or_resume(run, checkpoint)

    say(f"model: {config} | {model.num_params() / 1e6:.2f}M parameters")
    say(f"device {ctx.device} x {ctx.world_size} | dtype {run.precision} | compile "
        f"{bool(args.compile)}{' | FSDP' if args.fsdp else ''}")
    say(f"total batch {args.total_batch_size} tokens = {B} x {T} x {ctx.world_size} ranks x {run.accum_steps} "
        "accumulation steps")
    say(f"loss: {f'chunks of {model.loss_chunk_size} positions' if model.loss_chunk_size else 'full logits'}")
    # the peak table holds tensor-core bf16/fp16 peaks (under FSDP, run.dtype is float32 and FSDP itself casts to
    # bf16: the precision says which)
    on_tensor_cores = ctx.device_type == "cuda" and run.precision != "float32"
    peak = gpu_peak_flops(torch.cuda.get_device_name(ctx.device)) if on_tensor_cores else None  # hook: hardware
    run.peak_flops = peak * ctx.world_size if peak else None
    # hook: live metrics (--tensorboard, --wandb); a resumed run continues the checkpoint's curves
    run.metrics = Metrics(run, checkpoint)
    del checkpoint  # free its tensors
    if ctx.master:
        record_run(run, start_step)  # hook: progress (run.json; a note if the run will take days)
    train_loop(run, start_step, val_loss)


# =============================================================================
# Optional machinery. Everything above is the seed's training run; what follows is reached from it only through
# the calls marked "hook:" (and from the command line).
# =============================================================================


# -----------------------------------------------------------------------------
# Launch: the device, and one process per GPU under torchrun, srun or mpirun


def pick_device(requested="auto"):
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def local_rank_from_env(rank):
    """The GPU of this process on its node (RANK is global across nodes): LOCAL_RANK from torchrun, else the local
    rank Slurm or MPI set (srun, mpirun), else RANK modulo the GPUs of a node (ranks numbered node by node)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if name in os.environ:
            return int(os.environ[name])
    return rank % max(1, torch.cuda.device_count())


def restart_safe_group(rank, world_size):
    """init_process_group's store under torchrun. torchrun --max-restarts gives every attempt the same rendezvous
    store: a restarted group would read the dead one's addresses (a hang, or "Connection refused"), so the keys of
    each attempt get a prefix of their own. Without torchrun (srun, mpirun): {}, env:// as usual."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, _, _ = next(dist.rendezvous("env://"))
    return dict(store=dist.PrefixStore(f"attempt{attempt}/", store), rank=rank, world_size=world_size)


def setup_distributed(requested_device):
    """Under torchrun (RANK and WORLD_SIZE set): one process per GPU with NCCL, or per CPU process with gloo."""
    device = pick_device(requested_device)
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        if device.startswith("cuda:"):  # else seeding, synchronize, the dtype's capability query act on GPU 0
            torch.cuda.set_device(device)
        return DistContext(False, 0, 0, 1, device)
    # Import dynamo before the process group exists. Imported afterwards (DDP and torch.compile import it), it keeps
    # a reference to the group, so destroy_process_group cannot join gloo's worker threads; one that frees its last
    # tensor after Python has begun shutting down aborts the process ("terminate called without an active exception").
    from torch import _dynamo  # noqa: F401 (binds no local `torch`, which the lines above use)

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = local_rank_from_env(rank)
    group = restart_safe_group(rank, world_size)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device), **group)
    else:
        dist.init_process_group(backend="gloo", **group)
    return DistContext(True, rank, local_rank, world_size, device)


# -----------------------------------------------------------------------------
# FSDP2: parameters, gradients and optimizer state sharded over the ranks (--fsdp)
#
# DDP keeps everything on every GPU: 4 bytes of weights, 4 of gradients and 8 of AdamW moments per parameter. FSDP2
# (torch.distributed.fsdp.fully_shard) keeps 1/world_size of each; a block's weights are all-gathered just before
# its forward and backward, and its gradients reduce-scattered after. Parameters become DTensors, with the names of
# the plain model, so the fused AdamW, clip_grad_norm_ (a global norm over all shards) and the checkpoint format
# stay those of a single process: a checkpoint moves between one process, DDP and FSDP.


def fsdp_api():
    """FSDP2's API: public in torch.distributed.fsdp since torch 2.6 (2.4 and 2.5 keep it in a private module)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        raise UsageError(f"--fsdp needs torch >= 2.6 (FSDP2 in torch.distributed.fsdp), this is torch "
                         f"{torch.__version__}: upgrade torch (pip install -U torch) or drop --fsdp") from None
    return MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def shard_model(model, ctx, dtype):
    """(train_model, autocast dtype). Each Block is one FSDP group, the root holds the rest: wte and lm_head are
    one tied parameter, and both modules live in the root, so the tie survives sharding. The root is sharded in
    place, so `model` and train_model are the same module (its forward all-gathers: every rank must call it).
    Not compiled yet: compile_blocks, once --batch_size auto has probed the sharded model."""
    from torch.distributed.device_mesh import init_device_mesh

    MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method = fsdp_api()
    if dtype == torch.float16:
        raise UsageError("--fsdp runs in bfloat16 or float32 (float16 would need a sharded gradient scaler): use "
                         "--dtype bfloat16 or float32")
    mesh = init_device_mesh(ctx.device_type, (ctx.world_size,))
    # bf16: FSDP casts the gathered weights to bf16 for compute, keeps the fp32 master shards, and reduces gradients
    # in fp32. Autocast on top would only re-cast the same weights, so it is switched off (LayerNorm runs in bf16).
    # Inputs are not cast: a block's come from the bf16 root already, and the rotary cos/sin tables (--arch modern)
    # stay float32 as under DDP's autocast
    param_dtype = None if dtype == torch.float32 else dtype
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # sampling and HellaSwag call these instead of forward(): they must gather the root's weights too
    register_fsdp_forward_method(model, "generate")
    register_fsdp_forward_method(model, "logits_at")
    if ctx.master:
        name = str(dtype).replace("torch.", "")
        compute = name if dtype == torch.float32 else f"{name} (FSDP casts the weights; no autocast)"
        print(f"FSDP: {len(model.transformer.h)} blocks + root sharded over {ctx.world_size} ranks | compute {compute} "
              "| gradients reduced in float32")
    return model, torch.float32


def compile_blocks(model):
    """In place (names unchanged): under FSDP each compiled graph sits between two all-gathers."""
    for block in model.transformer.h:
        block.compile()


def state_bytes_per_rank(model, optimizer):
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards under FSDP)."""
    params = list(model.parameters())
    opt_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "parameters": sum(local_part(p).nbytes for p in params),
        "gradients": sum(local_part(p.grad).nbytes for p in params if p.grad is not None),
        "optimizer": sum(local_part(v).nbytes for v in opt_tensors),
    }


def state_memory_line(model, optimizer, ctx):
    b = state_bytes_per_rank(model, optimizer)
    how = "a full copy" + (" on every rank" if ctx.ddp else "")
    how = f"FSDP, 1/{ctx.world_size} each" if is_sharded(model) else how
    return "state per rank: " + " | ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in b.items()) + f" ({how})"


def rekey_optimizer_state(state, key):
    """An optimizer state_dict with each parameter's key k replaced by key[k] (names <-> param-group order)."""
    groups = [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]]
    return {"state": {key[k]: s for k, s in state["state"].items()}, "param_groups": groups}


def full_state_dicts(model, optimizer, ctx):
    """(model state_dict, optimizer state_dict) of the whole model on rank 0, (None, None) on the others.
    Under FSDP every rank must call it: the shards are gathered one tensor at a time and moved to CPU (cpu_offload),
    so no GPU ever holds the whole optimizer state. The optimizer's is converted to a plain AdamW's format."""
    if not is_sharded(model):
        return (model.state_dict(), optimizer.state_dict()) if ctx.master else (None, None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not ctx.master:
        return None, None
    # keyed by parameter name here; a plain optimizer numbers its parameters 0, 1, ... in param-group order
    index = {name: i for i, name in enumerate(n for g in optim_state["param_groups"] for n in g["params"])}
    return model_state, rekey_optimizer_state(optim_state, index)


def load_optimizer_state(model, optimizer, state):
    """Load a plain AdamW state_dict (from any of single process, DDP, FSDP) into the optimizer; under FSDP each
    rank keeps its shards of the full tensors (every rank has read the checkpoint)."""
    if not is_sharded(model):
        if next(model.parameters()).device.type == "cpu":
            # AdamW keeps the very tensors it is given on the CPU: copies, not pages of the memory-mapped checkpoint
            # (whose mapping would then hold the file, even once pruned, for the whole run)
            state = copy.deepcopy(state)
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    named = rekey_optimizer_state(state, names)
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------
# --batch_size auto and the loss path on GPUs: what the memory allows

# the float32 logits may take this share of the free GPU memory before the loss is computed in chunks
FULL_LOGITS_MEMORY_FRACTION = 0.25
# eager (uncompiled root: --compile 0, or FSDP, which compiles the blocks), the soft-capped head of --arch modern
# saves three float32 (B, T, vocab) tensors for backward (tanh's output and two of cross-entropy's; counted with
# saved_tensors_hooks) and makes a gradient of that size: four, not one. Compiled, it is fused like GPT-2's head
EAGER_SOFTCAP_LOGITS_COPIES = 4


def head_is_fused(args, model):
    """Whether torch.compile sees the head and the loss together: a compiled root (FSDP compiles only the blocks)."""
    return bool(args.compile) and not is_sharded(model)


def training_loss_chunk_size(model, ctx, B, T, fused_head=True):
    """The loss path of a training micro-batch B x T: 0 (full logits and F.cross_entropy, build-nanogpt's path, which
    torch.compile fuses) on CUDA when its float32 logits (and their copies) take at most FULL_LOGITS_MEMORY_FRACTION
    of the free memory; else chunks. CPUs always chunk: measured faster there and 54% lighter (bench.py --mode
    memory)."""
    if ctx.device_type == "cuda":
        copies = 1 if fused_head or model.softcap is None else EAGER_SOFTCAP_LOGITS_COPIES
        logits_bytes = copies * B * T * model.config.vocab_size * 4
        if logits_bytes <= torch.cuda.mem_get_info(ctx.device)[0] * FULL_LOGITS_MEMORY_FRACTION:
            return 0
    return default_loss_chunk_size(torch.device(ctx.device_type))


def find_batch_size(fits, largest):
    """The largest divisor B of largest for which fits(B) is True, by bisection (fits must be monotone in B).
    With largest = total_batch_size // (T * world_size) every divisor is a micro-batch the total batch allows."""
    candidates = [b for b in range(1, largest + 1) if largest % b == 0]
    if fits(candidates[-1]):
        return candidates[-1]
    lo, hi = -1, len(candidates) - 1  # candidates[lo] fits (-1: none known), candidates[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(candidates[mid]) else (lo, mid)
    if lo < 0:
        raise UsageError("--batch_size auto: not even a micro-batch of 1 fits in memory; use a smaller --model or "
                         "--seq_len")
    return candidates[lo]


def grow_batch_size(candidates, peak, budget):
    """The largest of the ascending candidates b with peak(b) <= budget(b), trying them in order and stopping at
    the first that fails or that the line through the last two peaks measured (from peak(0)) puts over budget.
    0 if none fits."""
    points, best = [(0, peak(0))], 0
    for b in candidates:
        if len(points) > 1:
            (b0, m0), (b1, m1) = points[-2:]
            if m1 + (m1 - m0) * (b - b1) / (b1 - b0) > budget(b):
                break
        m = peak(b)
        if m > budget(b):
            break
        best = b
        points.append((b, m))
    return best


def cuda_probe_peak(model, B, T, device, dtype):
    """Peak bytes allocated during a forward and backward of micro-batch B (the model's own included); inf if it
    runs out of memory."""
    x = torch.randint(0, GPT2_VOCAB, (B, T), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with autocast_context(device.split(":")[0], dtype):
            _, loss = model(x, x)
        loss.backward()
        return torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        if is_sharded(model) and hasattr(model, "reset_iter_state"):  # FSDP stopped mid-forward or -backward
            model.reset_iter_state()
        return math.inf
    finally:
        model.zero_grad(set_to_none=True)
        loss = None
        torch.cuda.empty_cache()


# share of the GPU memory a probed step may peak at: the rest is for what the uncompiled probe does not show
# (compile's workspace, the allocator's fragmentation, the val and HellaSwag passes)
BATCH_PROBE_MEMORY_FRACTION = 0.85


def training_state_bytes(num_params, ddp, fsdp_shards=0, accumulating=False):
    """GPU bytes training holds that a forward+backward probe does not allocate: AdamW's two float32 moments per
    parameter, and under DDP its float32 gradient buckets. Under FSDP (fsdp_shards ranks) the moments are sharded,
    and FSDP accumulates float32 gradients of the whole model between micro-steps."""
    if fsdp_shards:
        return num_params * 8 // fsdp_shards + (num_params * 4 if accumulating else 0)
    return num_params * (8 + (4 if ddp else 0))


def cuda_usable_bytes(ctx):
    """The GPU memory this process may use: what the other processes on this GPU leave us."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(ctx.device)[0] + torch.cuda.memory_reserved(ctx.device)


def agree_batch_size(find, ctx):
    """find() on this rank, then the smallest B over the ranks. A rank where nothing fits (find raises) still joins
    the all-reduce, so that every rank stops with the error instead of waiting for it until the NCCL timeout."""
    try:
        B, error = find(), None
    except UsageError as e:
        B, error = 0, e
    B = int(agreed(B, ctx, dist.ReduceOp.MIN))
    if B == 0:
        raise error or UsageError("--batch_size auto: not even a micro-batch of 1 fits in memory on another rank; "
                                  "use a smaller --model or --seq_len")
    return B


def fsdp_batch_size(model, ctx, dtype, T, largest, fused_head=True):
    """--batch_size auto under FSDP, probing the sharded model. Its forward and backward are collectives: every rank
    runs the same probes (the smallest budget and the largest peak over ranks decide), and none that is expected
    to run out of memory, since one rank failing would leave the others waiting in an all-gather. So micro-batches
    go from small to large, each probed only if the line through the last two peaks keeps it within budget."""
    usable = agreed(cuda_usable_bytes(ctx), ctx, dist.ReduceOp.MIN)
    n = model.num_params()

    def budget(b):  # the optimizer's shards, and the unsharded gradients accumulated when b needs micro-steps
        return int(usable * BATCH_PROBE_MEMORY_FRACTION) - training_state_bytes(n, ctx.ddp, ctx.world_size, b < largest)

    def peak(b):
        if b == 0:  # the shards alone
            return agreed(torch.cuda.memory_allocated(ctx.device), ctx, dist.ReduceOp.MAX)
        model.loss_chunk_size = training_loss_chunk_size(model, ctx, b, T, fused_head)
        return agreed(cuda_probe_peak(model, b, T, ctx.device, dtype), ctx, dist.ReduceOp.MAX)

    B = grow_batch_size([b for b in range(1, largest + 1) if largest % b == 0], peak, budget)
    model.loss_chunk_size = None
    if not B:
        raise UsageError("--batch_size auto: not even a micro-batch of 1 fits in memory under FSDP; "
                         "use more GPUs, a smaller --model or --seq_len")
    return B


def choose_batch_size(args, model, ctx, dtype):
    """--batch_size, or for 'auto' the largest micro-batch that fits and divides the total batch (the same on
    every rank). Under FSDP `model` is the sharded model."""
    if args.batch_size != "auto":
        return args.batch_size
    T = args.seq_len
    if args.total_batch_size % (T * ctx.world_size):
        raise UsageError(f"--total_batch_size {args.total_batch_size} is not a multiple of seq_len*world_size = "
                         f"{T}*{ctx.world_size}, so no micro-batch adds up to it")
    largest = args.total_batch_size // (T * ctx.world_size)
    fused = head_is_fused(args, model)
    if ctx.device_type == "cuda" and is_sharded(model):
        return agree_batch_size(lambda: fsdp_batch_size(model, ctx, dtype, T, largest, fused), ctx)
    if ctx.device_type == "cuda":
        share = int(cuda_usable_bytes(ctx) * BATCH_PROBE_MEMORY_FRACTION)
        budget = share - training_state_bytes(model.num_params(), ctx.ddp)  # what a probed step may peak at

        def fits(b):
            model.loss_chunk_size = training_loss_chunk_size(model, ctx, b, T, fused)  # the path training will use
            return cuda_probe_peak(model, b, T, ctx.device, dtype) <= budget

        B = agree_batch_size(lambda: find_batch_size(fits, largest), ctx)
        model.loss_chunk_size = None
        return B
    # no reliable out-of-memory signal off CUDA: the OS kills the process instead. ~6 GB for gpt2 at T=1024
    return agree_batch_size(lambda: find_batch_size(lambda b: b * T <= 8192, largest), ctx)


# -----------------------------------------------------------------------------
# Hardware: precision, FLOPs, memory allocator


def cpu_has_native_bf16():
    # AVX512-BF16 or AMX: bf16 matmuls at twice the fp32 rate or more; elsewhere bf16 is emulated and slow
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not {"avx512_bf16", "amx_bf16"}.isdisjoint(flags)
    except (OSError, AttributeError, RuntimeError):
        return False


def pick_dtype(requested, device_type):
    """The autocast dtype. bf16 has float32's exponent range, so unlike fp16 it needs no loss scaling;
    fp16 is for GPUs without bf16 (V100, T4)."""
    if requested != "auto":
        return getattr(torch, requested)
    if device_type == "cuda":
        # bf16 tensor cores start with Ampere (compute capability 8.0). torch.cuda.is_bf16_supported() also says yes
        # on V100/T4 (sm70/sm75), where bf16 is emulated: slow, and the MFU would be against the wrong peak
        return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    if device_type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


# dense bf16 tensor-core peak FLOP/s from the datasheets (no sparsity); the first name found in the device name wins
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),  # H100: SXM
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12),
    ("V100", 125e12), ("T4", 65e12),  # fp16 (no bf16 tensor cores)
]


def gpu_peak_flops(device_name):
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in device_name), None)


def flops_per_token(config, T):
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's QK^T and AV
    (PaLM paper, appendix B). The embeddings do no matmul, so they are left out; the modern block has the same
    matmuls (its norms, rotary and soft-cap are elementwise, negligible): one formula for both archs."""
    # lm_head (one matmul, tied with wte or not), then per layer attention 4 C^2 and MLP 8 C^2
    N = config.vocab_size * config.n_embd + config.n_layer * 12 * config.n_embd**2
    return 6 * N + 12 * config.n_layer * config.n_embd * T


def tune_cpu_allocator():
    """Keep big buffers (activations, logits) on glibc's heap: by default blocks over 32 MB are mmapped and
    unmapped on free, and every step paid page faults for hundreds of MB, ~30% of a CPU step's time."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl)
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest it takes


def setup_device(args, ctx):
    """The autocast dtype, with the device's fast math switched on and the seeds set."""
    dtype = pick_dtype(args.dtype, ctx.device_type)
    if dtype == torch.float16 and ctx.device_type != "cuda":
        raise UsageError("--dtype float16 needs a CUDA GPU (it is for GPUs without bf16); use --dtype bfloat16 or "
                         "float32")
    if ctx.device_type == "cuda":
        # TF32 tensor cores for the float32 matmuls that autocast leaves (10-bit mantissa, plenty for training)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.manual_seed(args.seed)
    if ctx.device_type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(args.seed)
    return dtype


# -----------------------------------------------------------------------------
# Progress: step N/M with the time left, a note at start for a run that will take days, and run.json (what the run
# trains on, which play.ipynb reads beside log.txt)


def format_duration(seconds):
    """'45s', '12m05s', '3h20m', '2d04h': two units at most."""
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{s % size // sub_size:02d}{sub}"
    return f"{s}s"


class StepTimer:
    """The mean time of this process's steps, leaving out its first `skip` (compilation, allocator warm-up); the
    evaluations between steps are not timed."""

    def __init__(self, skip=2):
        self.skip, self.seen, self.total, self.counted = skip, 0, 0.0, 0

    def add(self, dt):
        self.seen += 1
        if self.seen > self.skip:
            self.total += dt
            self.counted += 1

    def eta(self, steps_left):
        """The time the steps left take at the mean so far ('-' before any step counted), for the step line."""
        return format_duration(self.total / self.counted * steps_left) if self.counted else "-"


def matmul_rate(device, dtype):
    """FLOP/s of a square matmul in dtype on device, the best of 3 after a warm-up: this machine's speed now. Large
    enough to keep a GPU busy, small enough to cost a CPU milliseconds; torch.ones leaves the seeded RNG alone."""
    n = 512 if str(device) == "cpu" else 4096
    a = torch.ones(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        (a @ a)[0, 0].item()  # .item() waits for a GPU to finish
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:])


def long_run_note(run, config, steps):
    """One line for a run that will take more than a day, else None: its FLOPs at half the matmul rate measured on
    the device (training reaches about half of it: 66% MFU on a CPU in bench.py, 40-60% on GPUs). The step lines'
    eta, from the steps' own times, then takes over."""
    args = run.args
    flops = flops_per_token(config, args.seq_len) * args.total_batch_size * steps
    rate = matmul_rate(run.ctx.device, getattr(torch, run.precision)) * run.ctx.world_size
    seconds = flops / (0.5 * rate)
    if seconds < 86400:
        return None
    return (f"note: this run will take about {format_duration(seconds)}: {steps} steps of {args.total_batch_size:,} "
            f"tokens at half the {rate / 1e9:,.0f} GFLOP/s that {run.precision} matmuls reach on {run.ctx.device} x "
            f"{run.ctx.world_size} (the step lines' eta will be closer). A first run on a CPU: README's quickstart, "
            "`python train_gpt2.py --recipe shakespeare`, a small GPT on Tiny Shakespeare in minutes")


def data_kind(data):
    """What --data holds, for run.json: text, fineweb-edu (also shards named as build-nanogpt's fineweb.py names
    them), local files (fineweb.py --local_files), another hub dataset's name, or shards (of unknown origin)."""
    if data.endswith(".txt"):
        return "text"
    try:
        with open(os.path.join(data, "manifest.json")) as f:  # fineweb.py's record of what it tokenized
            settings = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return "fineweb-edu" if glob.glob(os.path.join(data, "edufineweb_*.npy")) else "shards"
    dataset = settings.get("dataset") or "local files"
    return "fineweb-edu" if dataset == "HuggingFaceFW/fineweb-edu" else dataset


def run_record(args, config, params):
    """What the run trains on and with, for play.ipynb (which draws the GPT-2 baselines only where they apply)."""
    return dict(
        data=args.data, data_kind=data_kind(args.data), init_from=args.init_from,
        model=args.model if args.init_from == "scratch" else args.init_from, arch=config.arch,
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=config.vocab_size,
        params=params, recipe=args.recipe, optimizer=args.optimizer, max_steps=args.max_steps,
        total_batch_size=args.total_batch_size, seq_len=args.seq_len,
    )


def write_run_record(log_dir, record):
    """run.json beside log.txt (rewritten by a resumed run): log.txt keeps its `STEP STREAM VALUE` lines only."""
    with open(os.path.join(log_dir, "run.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def record_run(run, start_step):
    write_run_record(run.args.log_dir, run_record(run.args, run.model.config, run.model.num_params()))
    note = long_run_note(run, run.model.config, run.args.max_steps - start_step)
    if note:
        print(note)


# -----------------------------------------------------------------------------
# Live metrics: TensorBoard (--tensorboard) and Weights & Biases (--wandb)
#
# Both off by default; global rank 0 writes, and each package is imported only when its flag asks for it. Step N's
# values are log.txt's step N: the evaluations at N score the model after N steps, the train loss is step N's batch.
# A resumed run continues the same curves. TensorBoard: its writer hides every event at or after the checkpoint's
# step (purge_step), and the resumed run logs them again, the checkpoint step's evaluations included (from log.txt
# and the checkpoint). wandb: the checkpoint keeps the run's id and the resumed run continues that run; the steps
# the server already holds (the interrupted run's after its checkpoint, the same values: resume is exact) are not
# sent again.

EVAL_TAGS = {"val": "val/loss", "hella": "hellaswag/acc_norm"}  # log.txt stream: metric


def check_metrics_packages(args):
    """--tensorboard and --wandb need their package where the metrics are written (global rank 0)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for package in ("tensorboard", "wandb"):  # each flag is named after the package it needs
        if getattr(args, package) is not None and importlib.util.find_spec(package) is None:
            raise UsageError(f"--{package}: the {package} package is not installed; pip install {package}")


def lr_group_names(optimizer):
    """A name per param group: adamw0 (matrices and embeddings), adamw1 (biases, gains), muon0 (Muon's matrices)."""
    inner = getattr(optimizer, "optimizers", [optimizer])  # MultiOptimizer: AdamW and Muon
    return [f"{type(opt).__name__.lower()}{i}" for opt in inner for i in range(len(opt.param_groups))]


def run_config(run):
    """The flags and the model config, as the run's hparams / config (numbers, strings and booleans)."""
    flat = {**run.flags(), **{f"model.{k}": v for k, v in asdict(run.model.config).items()}}
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def open_tensorboard(log_dir, start_step, config):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    # purge_step: an earlier run's events in log_dir at or after start_step are hidden (0: a run started over)
    writer = SummaryWriter(log_dir, purge_step=start_step)
    experiment, session_start, _ = hparams(config, {tag: None for tag in ("train/loss", *EVAL_TAGS.values())})
    writer.file_writer.add_summary(experiment, start_step)
    writer.file_writer.add_summary(session_start, start_step)
    return writer


def open_wandb(args, config, run_id):
    import wandb

    directory = None if "WANDB_DIR" in os.environ else args.log_dir
    try:  # no login, no network, a project name wandb refuses: one line now, not a traceback
        return wandb.init(project=args.wandb, name=args.wandb_run, id=run_id, resume="allow", config=config,
                          dir=directory)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--wandb {args.wandb}: wandb could not start the run ({why}); run `wandb login`, or set "
                         "WANDB_MODE=offline") from None


class Metrics:
    """A run's metrics in TensorBoard and wandb, written by global rank 0. Without --tensorboard and --wandb, and
    on the other ranks, every method does nothing. The MFU is against run.peak_flops (None: no MFU)."""

    def __init__(self, run, checkpoint=None):
        args, ctx = run.args, run.ctx
        # what the steps' metrics need, not run itself: run holds this object, and a cycle would keep the model (and
        # DDP's gloo threads) alive after train() until the garbage collector runs
        self.optimizer, self.train_loader, self.log_file = run.optimizer, run.train_loader, run.log_file
        self.tokens_per_step = args.total_batch_size
        self.flops_per_step = flops_per_token(run.model.config, args.seq_len) * args.total_batch_size
        self.peak_flops, self.cuda_device = run.peak_flops, ctx.device if ctx.device_type == "cuda" else None
        self.tb = self.wandb_run = None
        saved = checkpoint.get("metrics", {}) if checkpoint else {}
        self.wandb_id = saved.get("wandb_id")  # kept across resumes, also by runs without --wandb
        self.last_texts = None  # [step, name, texts] of the latest samples, for the checkpoint of their step
        self.first_wandb_step = 0  # steps below it are in the wandb run already
        if not ctx.master or (args.tensorboard is None and args.wandb is None):
            return
        start_step = checkpoint["step"] if checkpoint else 0
        config = run_config(run)
        if args.tensorboard is not None:
            self.tb = open_tensorboard(args.tensorboard or args.log_dir, start_step, config)
        if args.wandb is not None:
            self.wandb_run = open_wandb(args, config, self.wandb_id)
            self.wandb_id, self.first_wandb_step = self.wandb_run.id, self.wandb_run.starting_step
        if start_step:
            self.replay(start_step, saved.get("last_texts"))

    def replay(self, step, last_texts):
        """A resumed run: log the checkpoint step's evaluations again (TensorBoard dropped them with the step's
        other events): the values from log.txt, the samples from the checkpoint."""
        if os.path.exists(self.log_file):
            with open(self.log_file) as f:
                for line in f:
                    s, stream, value = line.split()
                    if int(s) == step and stream in EVAL_TAGS:
                        self.log_eval(step, stream, float(value))
        if last_texts and last_texts[0] == step:
            self.log_text(*last_texts)

    def log(self, step, values):
        if self.tb:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb_run and step >= self.first_wandb_step:
            self.wandb_run.log(values, step=step)

    def log_step(self, step, loss, norm, dt):
        """After training step `step`: its loss, learning rates, gradient norm, speed, tokens seen and epoch."""
        if not (self.tb or self.wandb_run):
            return
        tokens = self.tokens_per_step
        values = {"train/loss": loss, "train/grad_norm": norm, "train/tokens": (step + 1) * tokens,
                  "train/epoch": self.train_loader.epoch + 1, "perf/step_time_ms": 1000 * dt,
                  "perf/tokens_per_s": tokens / dt}
        for name, group in zip(lr_group_names(self.optimizer), self.optimizer.param_groups):
            values[f"lr/{name}"] = group["lr"]
        if self.peak_flops:
            values["perf/mfu_percent"] = 100 * self.flops_per_step / dt / self.peak_flops
        if self.cuda_device:
            values["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.cuda_device) / 2**30
        self.log(step, values)

    def log_eval(self, step, stream, value):
        """An evaluation, by its log.txt stream (val, hella)."""
        self.log(step, {EVAL_TAGS[stream]: value})

    def log_text(self, step, name, texts):
        if not (self.tb or self.wandb_run):
            return
        self.last_texts = [step, name, list(texts)]
        if self.tb:
            self.tb.add_text(name, "\n\n".join(f"    {text}" for text in texts), step)  # indented: shown verbatim
        if self.wandb_run and step >= self.first_wandb_step:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=["i", "text"], data=list(enumerate(texts)))}, step=step)

    def state(self):
        """What a checkpoint keeps: the wandb run to continue, the samples to show again at its step."""
        return {k: v for k, v in [("wandb_id", self.wandb_id), ("last_texts", self.last_texts)] if v is not None}

    def flush(self):
        """At checkpoints, so that a kill loses at most what follows the checkpoint (TensorBoard writes every 120 s
        otherwise; wandb streams online, and writes an offline run out when it finishes)."""
        if self.tb:
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb_run:
            self.wandb_run.finish(exit_code=1 if sys.exc_info()[0] else 0)  # called in a finally: an error under way?


# -----------------------------------------------------------------------------
# Input checks: flags and files, before any work starts


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def ensure_text_data(path):
    """--data input.txt is Tiny Shakespeare: download it on first use."""
    if os.path.exists(path) or os.path.basename(path) != "input.txt":
        return
    print(f"downloading Tiny Shakespeare to {path}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise UsageError(f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({e}); download it yourself to "
                         f"{path}, or `git checkout input.txt` in the repository") from None
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the download there ({e.strerror or e}); pass --data with a writable "
                         "path") from None


def read_text_file(path):
    """The text of a --data .txt file, or a UsageError that says what is wrong with it."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: a directory, not a text file; pass a .txt file, or a directory of shards without "
                         "the .txt name")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert it to "
                         "UTF-8 (e.g. iconv -t utf-8)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e}); check the path and its permissions") from None
    if not text.strip():
        raise UsageError(f"{path}: the file is empty; pass a text file with something to train on")
    return text


def check_shard(path, vocab_size=GPT2_VOCAB):
    """Memory-map a token shard after checking it is what fineweb.py writes: a 1-D uint16 .npy of token ids below
    vocab_size. The id check is one vectorized max over the shard, read once (measured: see README)."""
    fix = "remake the shards with `python fineweb.py`, or move this file out of the --data directory"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if magic != b"\x93NUMPY":  # np.load would try it as a pickle and talk about allow_pickle
        raise UsageError(f"{path}: not a .npy file (no .npy header); {fix}")
    try:
        # a memory map reads only the pages a batch touches, instead of copying a 200 MB shard at each switch
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # not .npy, truncated, object arrays (pickles), unreadable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{path}: not a token shard ({reason}); {fix}") from None
    if not isinstance(tokens, np.ndarray):  # np.load opens a .npz archive as a dict-like
        raise UsageError(f"{path}: an .npz archive, not a .npy token shard; {fix}")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UsageError(f"{path}: a {tokens.ndim}-D {tokens.dtype} array, not the 1-D uint16 tokens of a shard; {fix}")
    if tokens.size == 0:
        raise UsageError(f"{path}: the shard holds no tokens; {fix}")
    top = int(tokens.max())
    if top >= vocab_size:
        raise UsageError(f"{path}: holds token id {top}, outside GPT-2's vocabulary of {vocab_size} (not GPT-2 "
                         f"tokens?); {fix}")
    return tokens


def check_checkpoint_model(checkpoint, path):
    """The config must be a GPTConfig and the weights exactly the tensors of that model; returns the model built
    on the meta device (shapes only, no memory)."""
    fix = "pass a checkpoint written by train_gpt2.py"
    config, sd = checkpoint["config"], checkpoint["model"]
    fields = set(GPTConfig.__dataclass_fields__)
    if not isinstance(config, dict) or set(config) != fields:
        raise UsageError(f"{path}: its config is not a GPT config (expected the keys {', '.join(sorted(fields))}); "
                         f"{fix}")
    positive = all(type(v) is int and v > 0 for k, v in config.items() if k != "arch")  # bools are not sizes
    if not positive or config["n_embd"] % config["n_head"]:
        raise UsageError(f"{path}: its config {config} is not a valid GPT config (positive whole numbers, n_embd "
                         f"divisible by n_head); {fix}")
    if config["arch"] not in ARCHS:
        raise UsageError(f"{path}: its config has arch {config['arch']!r}, not one of {', '.join(ARCHS)}; {fix}")
    try:
        with torch.device("meta"):
            model = GPT(GPTConfig(**config))
    except ValueError as e:  # e.g. an odd head size for the modern arch
        raise UsageError(f"{path}: {e}; {fix}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path}: its model entry is not a dict of tensors; {fix}")
    try:
        with warnings.catch_warnings():  # on the meta device it checks the keys and the shapes and copies nothing
            warnings.filterwarnings("ignore", message=".*to a meta parameter")
            model.load_state_dict(sd)
    except RuntimeError as e:
        # load_state_dict's error lists the missing keys, the unexpected ones and each wrong shape, a line each
        problems = [line.strip()[:200] for line in str(e).splitlines()[1:]]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"{path}: its weights do not fit its config: {' '.join(problems[:3])}{more}; {fix}") from None
    return model


def check_checkpoint_state(checkpoint, path, model):
    """--resume also needs the training state: flags, data positions, RNG states and an optimizer for this model."""
    fix = "resume from another checkpoint, or start a new run from its weights with --init_from"
    need = {"optimizer": dict, "args": dict, "train_loader": list, "rng": list}
    bad = [k for k, kind in need.items() if not isinstance(checkpoint.get(k), kind)]
    if bad:
        raise UsageError(f"{path}: holds weights but no training state to resume ({', '.join(bad)} missing or "
                         f"damaged); {fix}")
    ranks = checkpoint.get("world_size", 1)
    per_rank = len(checkpoint["train_loader"]) == ranks and len(checkpoint["rng"]) == ranks
    if not per_rank or "batch_size" not in checkpoint["args"]:
        raise UsageError(f"{path}: its data positions or RNG states do not match its world size {ranks}; {fix}")
    opt = checkpoint["optimizer"]
    parts = opt["optimizers"] if "optimizers" in opt else [opt]  # --optimizer muon: AdamW's and Muon's
    try:
        n_opt = sum(len(g["params"]) for part in parts for g in part["param_groups"])
        # each parameter's first moment (AdamW) or momentum (Muon) has its shape
        state_shapes = sorted(tuple(s["exp_avg" if "exp_avg" in s else "momentum_buffer"].shape)
                              for part in parts for s in part["state"].values())
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"{path}: its optimizer state is damaged; {fix}") from None
    params = list(model.parameters())
    param_shapes = sorted(tuple(p.shape) for p in params)
    fits = n_opt == len(params) and (not state_shapes or state_shapes == param_shapes)
    if not fits:
        raise UsageError(f"{path}: its optimizer state does not fit its model ({n_opt} tensors for {len(params)} "
                         f"parameters); {fix}")


# flags that decide the model and which tokens each step sees: a run can only resume with the same ones
# --data may change (the loader checks that the shards are the same); these change the run itself
RESUME_MUST_MATCH = ("model", "arch", "vocab_size", "init_from", "batch_size", "seq_len", "total_batch_size", "seed",
                     "shuffle", "optimizer", "schedule")


# flags of the optimization itself: the LR a step gets and how its update is made. Resuming with other values
# would silently move the run to another schedule (a finished 19073-step run resumed with --max_steps 40000
# would jump from min_lr back to 6x min_lr), so they must match; --extend alone changes --max_steps
RESUME_SCHEDULE = ("max_steps", "warmup_steps", "max_lr", "min_lr", "weight_decay", "grad_clip", "decay_frac",
                   "embed_lr", "muon_lr", "muon_momentum", "muon_weight_decay")


def check_resume_compatible(checkpoint, flags, world_size):
    """flags: this run's, as its checkpoints save them (Run.flags(): the command line and the run's precision and
    micro-batch). The schedule and the precision must be the checkpoint's too."""
    saved = checkpoint.get("args", {})
    extend = flags.get("extend", False)

    def differ(names):
        return [f"--{k} {saved[k]} -> {flags[k]}" for k in names if k in saved and saved[k] != flags[k]]

    diffs = differ(RESUME_MUST_MATCH)
    if checkpoint.get("world_size", world_size) != world_size:
        diffs.append(f"world size {checkpoint['world_size']} -> {world_size} (it changes each rank's data)")
    diffs += differ(k for k in RESUME_SCHEDULE if not (k == "max_steps" and extend))
    if extend and flags["max_steps"] < checkpoint["step"]:
        diffs.append(f"--max_steps {flags['max_steps']} is before the checkpoint's step {checkpoint['step']}")
    before, now = saved.get("precision"), flags.get("precision")
    if now and before != now and (before is not None or now == "float16"):
        before = before or "bfloat16 or float32"
        diffs.append(f"precision {before} -> {now} (--dtype {flags['dtype']}; pass --dtype {before})")
    if diffs:
        raise UsageError(f"cannot resume: this run differs from the checkpoint in {'; '.join(diffs)}; use the "
                         "checkpoint's settings (the eval, logging and checkpoint flags may change; --extend to train "
                         "to another --max_steps), or --init_from CKPT to start a new run from its weights")


def positive_int(value):
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def batch_size_arg(value):
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; use a whole number >= 1 or 'auto'") from None


def check_output_dir(path, flag):
    """A directory the program will write: it must be a directory (or creatable as one) that we can write."""
    target = os.path.abspath(path)
    while not os.path.exists(target):  # the nearest part of the path that exists
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        where = "it is a file" if target == os.path.abspath(path) else f"{target} is a file"
        raise UsageError(f"{path}: {flag} must be a directory, but {where}; pass another {flag}")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: {flag} is not writable ({target} is read-only for this user); pass another {flag}")


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_hf_dir(path, accepted):
    """A local Hugging Face directory must hold a GPT-2 or NanoChat config and weights; found here, not deep in
    transformers. Returns its model_type."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path}: no config.json, so it is not a Hugging Face model directory; {accepted}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable JSON config ({e}); re-export the model or pass another "
                         "directory") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in ("gpt2", "nanochat"):
        raise ValueError(f"{path}: a {kind!r} model, not GPT-2 or NanoChat (config.json model_type must be 'gpt2' or "
                         "'nanochat'); pass a Hugging Face GPT-2 model, or a NanoChat one of --arch modern")
    if not any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHTS):
        raise ValueError(f"{path}: no weights ({' or '.join(HF_WEIGHTS[::2])}); copy the model's weights file there "
                         "too")
    return kind


# what a NanoChat config must say to be an --arch modern model: field -> what our block has
NANOCHAT_FIXED = {
    "num_key_value_heads": "as many key/value heads as query heads (no grouped-query attention)",
    "head_dim": "heads of hidden_size / num_attention_heads",
    "intermediate_size": "an MLP 4 x hidden_size wide",
    "hidden_act": "ReLU^2",
    "attention_bias": "no biases",
    "rms_norm_eps": "RMSNorm with float32's eps",
    "rope_parameters": f"plain rotary embeddings of base {ROTARY_BASE}",
    "final_logit_softcapping": f"logits soft-capped at {LOGIT_SOFTCAP}",
}


def check_nanochat_config(path, config, ours):
    """A NanoChat config (transformers' NanoChatConfig) that --arch modern can hold: GPT-2's vocab and our block
    (ours: nanochat_config of the same sizes); otherwise a ValueError naming the field that differs."""
    if config.vocab_size not in (GPT2_VOCAB, 50304):
        raise ValueError(f"{path}: a NanoChat model with vocab_size {config.vocab_size}; train_gpt2.py's models use "
                         f"GPT-2's tokenizer ({GPT2_VOCAB} tokens, or 50304 padded): this one has another tokenizer")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{path}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")
    ours = {**ours, "head_dim": config.hidden_size // config.num_attention_heads}
    for field, what in NANOCHAT_FIXED.items():
        theirs = getattr(config, field, None)
        if field == "head_dim" and theirs is None:  # not set: hidden_size / num_attention_heads
            continue
        if theirs != ours[field]:
            raise ValueError(f"{path}: a NanoChat model with {field}={theirs!r}, which --arch modern cannot hold (it "
                             f"has {what}: {field}={ours[field]!r})")


# the files GPT.save_pretrained writes: --export may replace these, and nothing else, in an existing directory
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"}


def check_export_dir(path):
    """--export writes a Hugging Face directory: refuse to mix it into, or overwrite, a directory of other files."""
    check_output_dir(path, "--export")
    if os.path.isdir(path):
        others = sorted(set(os.listdir(path)) - EXPORT_FILES)
        if others:
            raise UsageError(f"{path}: --export directory already holds other files ({', '.join(others[:3])}); pass a "
                             "new or empty directory")


# the numeric flags' ranges, checked in this order: flag -> (the range in words, the check); None (unset) passes
FLAG_RANGES = {
    **dict.fromkeys(["seq_len", "total_batch_size", "val_tokens", "keep_checkpoints", "num_samples", "val_steps"],
                    (">= 1", lambda v: v >= 1)),
    **dict.fromkeys(["max_steps", "warmup_steps", "val_every", "hellaswag_every", "sample_every", "checkpoint_every",
                     "max_new_tokens"], (">= 0", lambda v: v >= 0)),
    "decay_frac": ("between 0 and 1", lambda v: 0 <= v <= 1),
    **dict.fromkeys(["muon_lr", "max_lr", "embed_lr"], ("> 0", lambda v: v > 0)),
    "muon_momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def check_args(args):
    """Mistakes that need no data or model to find, caught before any work starts."""
    for name, (allowed, ok) in FLAG_RANGES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            deprecated = " (and it is deprecated: use --val_tokens)" if name == "val_steps" else ""
            raise UsageError(f"--{name} must be {allowed}, got {value}{deprecated}")
    if args.vocab_size < GPT2_VOCAB:
        raise UsageError(f"--vocab_size {args.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB} tokens")
    if args.init_from == "scratch":
        with model_errors_as_usage_errors():  # an unknown --model
            config = model_config(args.model, args.vocab_size)
        check_seq_len(args.seq_len, config)
    if args.batch_size != "auto":
        grad_accum_steps(args.total_batch_size, args.batch_size, args.seq_len, 1)  # the world size is checked later
    if args.extend and not args.resume:
        raise UsageError("--extend continues a run: pass it with --resume")
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.fsdp and not under_torchrun and args.sample is None and not args.export:
        raise UsageError("--fsdp shards the model over the processes of a torchrun launch: run `torchrun --standalone "
                         "--nproc_per_node=N train_gpt2.py --fsdp ...`, or drop --fsdp")
    if args.fsdp:
        fsdp_api()  # an old torch: said now, not after the model is built
    if args.fsdp and args.optimizer == "muon":  # Newton-Schulz needs each whole matrix; FSDP leaves a rank a slice
        raise UsageError("--optimizer muon does not run under --fsdp yet (it orthogonalizes whole matrices, FSDP "
                         "shards them): use DDP (drop --fsdp) or --optimizer adamw")
    if (args.sample is not None or args.export) and args.init_from == "scratch":
        raise UsageError("--sample and --export need a trained model: pass --init_from (gpt2, a Hugging Face "
                         "directory, or log/model_XXXXX.pt)")
    if args.export:
        check_export_dir(args.export)
    elif args.sample is None:  # training writes log.txt and checkpoints
        check_output_dir(args.log_dir, "--log_dir")
        if args.tensorboard:
            check_output_dir(args.tensorboard, "--tensorboard")
        check_metrics_packages(args)


# -----------------------------------------------------------------------------
# Command line


# --recipe presets: flag values, best at small scale on CPU (bench.py --mode recipe; README "Faster than the seed")
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
    g.add_argument("--batch_size", type=batch_size_arg, default=64, help="micro-batch B per GPU, or 'auto': the "
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
    g = p.add_argument_group("faster recipes (README: Faster than the seed)")
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
    with model_errors_as_usage_errors():
        model = GPT.from_pretrained(args.init_from)
        if args.export:
            model.save_pretrained(args.export)
    if args.export:
        kind = "NanoChat" if model.config.arch == "modern" else "GPT-2"
        print(f"wrote a Hugging Face {kind} model and tokenizer to {args.export} (load them with "
              "AutoModelForCausalLM and AutoTokenizer .from_pretrained)")
    if args.sample is None:
        return
    device = pick_device(args.device)
    model.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    dtype = pick_dtype(args.dtype, device.split(":")[0])
    texts = sample(model, args.sample, generator, dtype, args.num_samples, args.max_new_tokens, args.temperature,
                   args.top_k or None)
    for text in texts:
        print(f"> {text}")


def main(argv=None):
    args = parse_args(argv)
    ctx = None
    try:
        check_args(args)
        if args.sample is not None or args.export:
            return sample_or_export(args)
        ctx = setup_distributed(args.device)
        train(args, ctx)
    except (UsageError, TrainingDiverged, CheckpointWriteFailed) as e:
        if not isinstance(e, CheckpointWriteFailed) or ctx.master:  # a failed write: one line; other ranks only stop
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    finally:
        if ctx is not None and ctx.ddp:
            dist.destroy_process_group()


def exit_without_teardown(code):
    """End a torchrun worker without Python's interpreter teardown. Gloo's worker threads can outlive the destroyed
    process group; one that frees its last tensor while the interpreter shuts down aborts the process ("terminate
    called without an active exception", SIGABRT), which turns a finished run into a failed one (seen in CI under
    FSDP). Everything the run writes is closed and synced before main() returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if "RANK" not in os.environ:
        main()
    else:
        try:
            main()
        except SystemExit as e:  # the one-line errors: their exit code, without the teardown either
            if not isinstance(e.code, int):
                raise
            exit_without_teardown(e.code)
        exit_without_teardown(0)

