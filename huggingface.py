"""
Hugging Face import and export: our GPT as transformers' GPT2LMHeadModel (--arch gpt2) or NanoChatForCausalLM
(--arch modern, transformers >= 5.0), both ways, with GPT-2's tokenizer. Each direction maps state dicts, so that
GPT.from_pretrained and GPT.save_pretrained in train_gpt2.py stay short; this module never imports train_gpt2.

NanoChat is our modern block: weightless RMSNorm after the embedding, before attention and MLP and at the end; rotary
embeddings with weightless per-head QK-norm; bias-free q/k/v/o and fc1 -> relu2 -> fc2; an untied lm_head; tanh
logit soft-capping.
"""

import types

import torch

import common
from common import GPT2_EOT, GPT2_VOCAB

# -----------------------------------------------------------------------------
# GPT-2: GPT2LMHeadModel, whose weights have our names


# Hugging Face's GPT-2 uses Conv1D modules, which store these Linear weights transposed
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # transformers' causal-mask buffers: not weights


def save_gpt2_tokenizer(directory, model_max_length=1024):
    """tokenizer.json + tokenizer_config.json for GPT-2's BPE, converted from tiktoken's (no download)."""
    from transformers import GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = common.gpt2_tokenizer()
    converter = TikTokenConverter(pattern=enc._pat_str, extra_special_tokens=enc._special_tokens)
    # the BPE ranks from memory, not from a file: tiktoken keeps a copy of every file it reads in its cache
    # (TIKTOKEN_CACHE_DIR), under a hash of the path, which a temporary file makes new each time
    converter.load_tiktoken_bpe = lambda _: enc._mergeable_ranks
    eot = enc.decode([GPT2_EOT])
    hf = GPT2TokenizerFast(tokenizer_object=converter.converted(), bos_token=eot, eos_token=eot, unk_token=eot,
                           model_max_length=model_max_length)
    hf.save_pretrained(directory)


def unloadable(path, kind, e):
    """The one-line error for a directory transformers could not load as `kind` (GPT-2, NanoChat): no network,
    a config it refuses, damaged weights, tensors of the wrong shape, ..."""
    msg = (str(e).strip().splitlines() or [""])[0]
    return ValueError(f"{path}: could not load it as {kind} with transformers ({type(e).__name__}: {msg}); pass a "
                      f"Hugging Face {kind} model")


def load_gpt2(name_or_path):
    """(sizes, state_dict) of our --arch gpt2 model from a hub name or a Hugging Face GPT-2 directory: sizes are
    GPTConfig's block_size, vocab_size, n_layer, n_head and n_embd; the Conv1D weights transposed to Linear's."""
    from transformers import GPT2LMHeadModel

    try:
        hf, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
    except Exception as e:
        raise unloadable(name_or_path, "GPT-2", e) from None
    # transformers fills weights missing from the file with random ones and only warns: a model missing
    # any weight is not the model the user meant
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(MASK_BUFFERS)]
    if missing:
        raise ValueError(f"{name_or_path}: its weights lack {len(missing)} of GPT-2's tensors "
                         f"({', '.join(missing[:3])}...); pass a complete Hugging Face GPT-2 model")
    c = hf.config
    sizes = dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
    sd = {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in hf.state_dict().items()
          if not k.endswith(MASK_BUFFERS)}
    return sizes, sd


def export_gpt2(state_dict, c):
    """transformers' GPT2LMHeadModel holding the weights of our --arch gpt2 model of config c (float32, the vocab cut
    back to the 50257 real tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = min(c.vocab_size, GPT2_VOCAB)
    hf_config = GPT2Config(
        vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, tie_word_embeddings=True,
    )
    sd = {}
    for k, v in state_dict.items():
        v = v.detach().float().cpu()
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:vocab]
        sd[k] = v.contiguous()
    hf = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith(MASK_BUFFERS) for k in missing), (missing, unexpected)
    return hf


# -----------------------------------------------------------------------------
# NanoChat (--arch modern): our weights renamed, c_attn split, and the rotation's direction flipped


NANOCHAT_TRANSFORMERS = "5.0"  # the first transformers release with NanoChat

# our weights -> theirs ({} is the layer). c_attn, one (3C, C) matrix, is their q_proj, k_proj and v_proj stacked;
# the norms have no weights on either side
NANOCHAT_WEIGHTS = {
    "transformer.wte.weight": ["model.embed_tokens.weight"],
    "transformer.h.{}.attn.c_attn.weight": [f"model.layers.{{}}.self_attn.{x}_proj.weight" for x in "qkv"],
    "transformer.h.{}.attn.c_proj.weight": ["model.layers.{}.self_attn.o_proj.weight"],
    "transformer.h.{}.mlp.c_fc.weight": ["model.layers.{}.mlp.fc1.weight"],
    "transformer.h.{}.mlp.c_proj.weight": ["model.layers.{}.mlp.fc2.weight"],
    "lm_head.weight": ["lm_head.weight"],
}

# what a NanoChat config must say to be an --arch modern model: field -> what our block has
NANOCHAT_FIXED = {
    "num_key_value_heads": "as many key/value heads as query heads (no grouped-query attention)",
    "head_dim": "heads of hidden_size / num_attention_heads",
    "intermediate_size": "an MLP 4 x hidden_size wide",
    "hidden_act": "ReLU^2",
    "attention_bias": "no biases",
    "rms_norm_eps": "RMSNorm with float32's eps",
    "rope_parameters": "plain rotary embeddings of our base",
    "final_logit_softcapping": "logits soft-capped as ours are",
}


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


def nanochat_config(c, rotary_base, softcap):
    """NanoChatConfig's arguments for our config c (its sizes); a padded vocab is cut to GPT-2's tokens."""
    return dict(
        vocab_size=min(c.vocab_size, GPT2_VOCAB), hidden_size=c.n_embd, intermediate_size=4 * c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        max_position_embeddings=c.block_size, hidden_act="relu2", attention_bias=False,
        # nn.RMSNorm and F.rms_norm default to the dtype's eps: float32's, as we compute them
        rms_norm_eps=torch.finfo(torch.float32).eps, rope_parameters=dict(rope_type="default", rope_theta=rotary_base),
        final_logit_softcapping=softcap, tie_word_embeddings=False,
        bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, pad_token_id=None,  # no pad row: the embedding trains whole
    )


def flip_rotary(c_attn, n_head):
    """c_attn's weight with the second half of every q and k head negated. NanoChat's rotate_half is [x2, -x1],
    our apply_rotary's [-x2, x1]: they turn each pair opposite ways. Given (x1, -x2), NanoChat's rotation is ours
    with the second half negated, in q and k alike, so every q.k is unchanged (so is the QK-norm: it ignores signs).
    Its own inverse: it converts both ways."""
    w = c_attn.reshape(3, n_head, 2, -1, c_attn.size(-1)).clone()
    w[:2, :, 1] *= -1
    return w.view_as(c_attn)


def nanochat_names(n_layer):
    """(our weight's name, their names) for every weight."""
    for ours, theirs in NANOCHAT_WEIGHTS.items():
        for i in range(n_layer) if "{}" in ours else [None]:
            yield ours.format(i), [t.format(i) for t in theirs]


def check_nanochat_config(path, config, ours):
    """A NanoChat config (transformers' NanoChatConfig) that --arch modern can hold: GPT-2's vocab and our block
    (ours: nanochat_config of the same sizes); otherwise a ValueError naming the field that differs."""
    if config.vocab_size not in (GPT2_VOCAB, 50304):  # 50304: train_gpt2.py's padded --vocab_size
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


def export_nanochat(state_dict, c, rotary_base, softcap):
    """transformers' NanoChatForCausalLM holding the weights of our --arch modern model of config c (float32, the
    vocab cut to GPT-2's)."""
    NanoChatConfig, NanoChatForCausalLM = nanochat_classes()
    ours = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    sd = {}
    for name, theirs in nanochat_names(c.n_layer):
        v = ours[name][:GPT2_VOCAB] if name in ("transformer.wte.weight", "lm_head.weight") else ours[name]
        if name.endswith("c_attn.weight"):
            v = flip_rotary(v, c.n_head)
        sd.update({t: part.contiguous() for t, part in zip(theirs, v.chunk(len(theirs)))})
    hf = NanoChatForCausalLM(NanoChatConfig(**nanochat_config(c, rotary_base, softcap)))
    hf.load_state_dict(sd)  # strict: every weight of theirs is one of ours
    return hf


def load_nanochat(path, rotary_base, softcap):
    """(sizes, state_dict) of our --arch modern model from a NanoChat directory whose architecture is ours: sizes
    are GPTConfig's block_size, vocab_size, n_layer, n_head and n_embd."""
    NanoChatConfig, NanoChatForCausalLM = nanochat_classes()

    try:
        c = NanoChatConfig.from_pretrained(path)
    except Exception as e:
        raise unloadable(path, "NanoChat", e) from None
    sizes = dict(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                 n_head=c.num_attention_heads, n_embd=c.hidden_size)
    check_nanochat_config(path, c, nanochat_config(types.SimpleNamespace(**sizes), rotary_base, softcap))
    try:
        hf, info = NanoChatForCausalLM.from_pretrained(path, config=c, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)  # said below, in one line
    except Exception as e:
        raise unloadable(path, "NanoChat", e) from None
    # weights missing from the file or of another shape: transformers fills them with random ones and warns
    bad = sorted(set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())})
    if bad:
        raise ValueError(f"{path}: its weights lack {len(bad)} of NanoChat's tensors or have another shape "
                         f"({', '.join(bad[:3])}); pass a complete Hugging Face NanoChat model of that config")
    sd_hf = hf.state_dict()  # a tied lm_head (tie_word_embeddings) is there too, as a copy of the embedding
    sd = {ours: torch.cat([sd_hf[t] for t in theirs]) for ours, theirs in nanochat_names(c.num_hidden_layers)}
    for k in sd:
        if k.endswith("c_attn.weight"):
            sd[k] = flip_rotary(sd[k], c.num_attention_heads)
    return sizes, sd
