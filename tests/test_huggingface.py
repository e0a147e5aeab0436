"""--export and loading back for --arch modern: a Hugging Face NanoChat directory (transformers >= 5.0) that
transformers loads as is, and that train_gpt2.py and hellaswag.py load back. (GPT-2 exports: test_train_gpt2.py.)
All on CPU, offline, with a d2 model trained a few steps."""

import json
import sys
import types

import pytest
import tiktoken
import torch
from safetensors.torch import load_file, save_file

import hellaswag
import huggingface
import train_gpt2 as tg
from conftest import main_error, train_here

# one thread: these models are tiny, and a second OpenMP thread costs more than it gains on a busy machine
torch.set_num_threads(1)
PROMPT = "ROMEO:"


def run_args(data, log_dir, **overrides):
    flags = dict(data=data, model="d2", arch="modern", seq_len=64, batch_size=4, total_batch_size=256, max_steps=3,
                 warmup_steps=1, max_lr=1e-2, val_every=0, hellaswag_every=0, sample_every=0, compile=0, device="cpu",
                 dtype="float32", log_dir=log_dir)
    flags.update(overrides)
    return [a for k, v in flags.items() for a in (f"--{k}", v)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shakespeare_file):
    """(checkpoint .pt, its --export directory) of a d2 --arch modern model trained 3 steps."""
    root = tmp_path_factory.mktemp("modern")
    train_here(run_args(shakespeare_file, root / "log"))
    ckpt = root / "log" / "model_00003.pt"
    out = train_here(["--init_from", ckpt, "--export", root / "export"])
    assert f"wrote a Hugging Face NanoChat model and tokenizer to {root / 'export'}" in out
    return ckpt, root / "export"


def tokens(text):
    return torch.tensor([tiktoken.get_encoding("gpt2").encode(text)])


def assert_same_logits(ours, theirs):
    """Ours (a padded vocab) cut to the 50257 real tokens against theirs: within 1e-4 of the largest logit."""
    assert theirs.shape[-1] == tg.GPT2_VOCAB
    diff = (ours[..., : tg.GPT2_VOCAB] - theirs).abs().max().item()
    assert diff <= 1e-4 * ours.abs().max().item(), diff


def test_export_loads_in_transformers_with_our_logits_greedy_tokens_and_pipeline(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    ckpt, export = exported
    assert sorted(p.name for p in export.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["vocab_size"] == tg.GPT2_VOCAB
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps and not config["tie_word_embeddings"]
    ours = tg.GPT.from_pretrained(ckpt).eval()
    assert ours.config.vocab_size == 50304
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    idx = torch.randint(0, tg.GPT2_VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(idx)[0]
        assert logits.std().item() > 0.1  # trained: not the zero-init head's uniform logits
        assert_same_logits(logits, hf(idx).logits)
    # greedy decoding: the same tokens through our generate and transformers' (and its KV cache)
    prompt = tokens(PROMPT)
    greedy = ours.generate(prompt, 16, top_k=1)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert theirs.tolist() == greedy.tolist()
    assert AutoTokenizer.from_pretrained(export)(PROMPT)["input_ids"] == prompt[0].tolist()
    text = pipeline("text-generation", model=str(export), device="cpu")(PROMPT, max_new_tokens=16, do_sample=False)
    assert text[0]["generated_text"] == tiktoken.get_encoding("gpt2").decode(greedy[0].tolist())


def test_init_from_the_export_gives_our_logits_and_fine_tunes(exported, shakespeare_file, tmp_path, capsys):
    ckpt, export = exported
    ours, again = tg.GPT.from_pretrained(ckpt).eval(), tg.GPT.from_pretrained(export).eval()
    assert again.config == tg.GPTConfig(block_size=1024, vocab_size=tg.GPT2_VOCAB, n_layer=2, n_head=2, n_embd=128,
                                        arch="modern")
    idx = torch.randint(0, tg.GPT2_VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_logits(ours(idx)[0], again(idx)[0])
    # fine-tuning from it: step 0's loss is the exported model's on the run's first micro-batch
    log_dir = tmp_path / "ft"
    train_here(run_args(shakespeare_file, log_dir, init_from=export, max_steps=1))
    x, y = tg.DataLoaderLite(4, 64, 0, 1, "train", str(shakespeare_file)).next_batch()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(again(x)[0].flatten(0, 1), y.flatten()).item()
    step0 = (log_dir / "log.txt").read_text().splitlines()[0].split()
    assert step0[:2] == ["0", "train"] and float(step0[2]) == pytest.approx(expected, abs=1e-5)
    assert "pass --arch modern" in main_error(run_args(shakespeare_file, tmp_path / "ft2", init_from=export,
                                                       arch="gpt2"), capsys)


def test_hellaswag_scores_the_export_as_the_checkpoint(exported, hellaswag_sample, monkeypatch, capsys):
    scores = []

    def spy(*args, **kwargs):  # every ending's summed and mean loss, as hellaswag.py computes them
        sum_loss, mean_loss = score_rows(*args, **kwargs)
        scores.append(torch.stack([sum_loss, mean_loss]))
        return sum_loss, mean_loss

    score_rows = hellaswag.score_rows
    monkeypatch.setattr(hellaswag, "score_rows", spy)
    results = []
    for model in exported:  # the .pt, then the export
        scores.clear()
        hellaswag.main(["-m", str(model), "--data", str(hellaswag_sample), "--limit", "6", "-d", "cpu"])
        results.append((capsys.readouterr().out.strip().splitlines()[-1], torch.cat(scores, dim=1)))
    (line_pt, scores_pt), (line_export, scores_export) = results
    assert line_pt.startswith("acc: ") and line_pt == line_export
    assert scores_pt.shape == (2, 24) and torch.allclose(scores_pt, scores_export, rtol=1e-5, atol=1e-5)


def nanochat_dir(path, weights=None, **overrides):
    """A NanoChat directory of our d1 shape (vocab 50257, 64 wide, 1 head, 16 positions) with random weights,
    or config changes and the given weights (dict: NanoChat's tensors)."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    ours = huggingface.nanochat_config(tg.GPTConfig(16, tg.GPT2_VOCAB, 1, 1, 64, "modern"), tg.ROTARY_BASE, tg.LOGIT_SOFTCAP)
    config = NanoChatConfig(**{**ours, **overrides})
    if weights is None:
        torch.manual_seed(0)
        hf = NanoChatForCausalLM(config)
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0.0, 0.3)
        hf.save_pretrained(path)
    else:
        config.save_pretrained(path)
        save_file(weights, path / "model.safetensors")
    return path


@pytest.mark.parametrize("field, value, needle", [
    ("num_key_value_heads", 1, "num_key_value_heads=1"),
    ("vocab_size", 65536, "vocab_size 65536"),
    ("intermediate_size", 128, "intermediate_size=128"),
    ("attention_bias", True, "attention_bias=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rms_norm_eps", 1e-6, "rms_norm_eps=1e-06"),
    ("rope_parameters", dict(rope_type="default", rope_theta=500000.0), "rope_parameters="),
    ("final_logit_softcapping", None, "final_logit_softcapping=None"),
    ("final_logit_softcapping", 30.0, "final_logit_softcapping=30.0"),
    ("head_dim", 16, "head_dim=16"),
])
def test_a_nanochat_dir_we_cannot_hold_is_one_line(tmp_path, capsys, field, value, needle):
    heads = dict(num_attention_heads=2, num_key_value_heads=2)  # head_dim 32
    kwargs = {**heads, field: value} if field in ("num_key_value_heads", "head_dim") else {field: value}
    path = nanochat_dir(tmp_path / "foreign", weights={}, **kwargs)  # found from the config: no weights read
    with pytest.raises(ValueError) as e:
        tg.GPT.from_pretrained(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    err = main_error(["--init_from", path, "--arch", "modern", "--sample", "hi"], capsys)
    assert needle in err and str(path) in err


def test_a_foreign_nanochat_dir_of_our_shapes_loads_and_broken_ones_are_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    # tied embeddings and a padded vocab: we hold both (an untied copy of the head)
    path = nanochat_dir(tmp_path / "tied", tie_word_embeddings=True, vocab_size=50304)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = tg.GPT.from_pretrained(path).eval()
    assert ours.config.vocab_size == 50304 and torch.equal(ours.lm_head.weight, ours.transformer.wte.weight)
    idx = torch.randint(0, tg.GPT2_VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(idx).logits
        assert theirs.abs().max().item() > 1.0
        assert_same_logits(ours(idx)[0], theirs[..., : tg.GPT2_VOCAB])
    # a weight missing, a weight of the wrong shape
    weights = load_file(nanochat_dir(tmp_path / "whole") / "model.safetensors")
    for name, change in [("model.layers.0.mlp.fc1.weight", lambda w: w.pop("model.layers.0.mlp.fc1.weight")),
                         ("lm_head.weight", lambda w: w.update({"lm_head.weight": torch.zeros(3, 64)}))]:
        broken = dict(weights)
        change(broken)
        with pytest.raises(ValueError) as e:
            tg.GPT.from_pretrained(nanochat_dir(tmp_path / name, weights=broken))
        assert f"lack 1 of NanoChat's tensors or have another shape ({name})" in str(e.value), e.value
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not GPT-2 or NanoChat"):
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
        tg.GPT.from_pretrained(tmp_path / "llama")


def test_transformers_without_nanochat_is_one_line_naming_the_version(exported, tmp_path, monkeypatch, capsys):
    ckpt, export = exported
    old = types.ModuleType("transformers")
    old.__version__ = "4.57.6"  # the last release before NanoChat
    monkeypatch.setitem(sys.modules, "transformers", old)
    for argv in (["--init_from", ckpt, "--export", tmp_path / "out"], ["--init_from", export, "--sample", "hi"]):
        err = main_error(argv, capsys)
        assert "transformers >= 5.0 (installed: 4.57.6)" in err
    assert not (tmp_path / "out").exists()
