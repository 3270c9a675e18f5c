"""Every public config key with its default; config files in configs/ start from `base_config()`.

`python -m jaxsft.run --list-keys` prints every key with its default and its comment here: the comment on the key's
line, continued by comment lines right under it; a key with none on its line takes the comment lines right above
it. A section comment (about the keys below it) follows a blank line.
RANGES and ITEMS say which values each key may hold; `jaxsft.config.check_values` refuses others before a run
loads or writes anything. A key whose default is None (a placeholder) may be set back to None: `--config.KEY=None`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"  # classification | causal_lm | seq2seq

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = ""  # local HF folder or hub id
    c.model.num_labels = config_dict.placeholder(int)  # None: inferred from the training labels; 1: regression
    c.model.decoder_start_token_id = config_dict.placeholder(int)  # seq2seq; None: from the checkpoint
    c.model.from_scratch = False  # True: the architecture of the checkpoint's config with fresh random weights

    # Speed / memory (decoder families llama, mistral, qwen2, qwen3, gemma; BERT-like encoders; see the README):
    c.model.remat = "none"  # none | dots (recompute all but matmul outputs) | full: per-layer rematerialisation
    c.model.scan_layers = False  # True: layers stacked and run under lax.scan (compile time independent of depth)
    # attention kernel: auto (cuDNN's fused kernel on GPU in bf16/fp16, Pallas splash on TPU, XLA elsewhere) | xla
    # (XLA's explicit path everywhere: to compare kernels, e.g. with jaxsft.aot, or to step around one)
    c.model.attention = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # .tsv .csv .json .jsonl .parquet, or an HF dataset spec such as glue/sst2:train
    c.data.eval = ""  # as data.train; "": no evaluation set (unless data.eval_fraction)
    # a mixture instead of data.train: several specs interleaved (datasets.interleave_datasets, seeded by `seed`:
    # the same examples in the same order on every run, so a resumed run goes on exactly), drawn with
    # data.mixture_weights (normalised; empty: in turn) until the first source runs out ("first_exhausted") or
    # every source has been seen whole, the others repeating ("all_exhausted": data.mixture_stopping)
    c.data.mixture = []
    c.data.mixture_weights = []
    c.data.mixture_stopping = "first_exhausted"
    c.data.tfds_data_dir = config_dict.placeholder(str)  # for tfds:NAME[:SPLIT] specs; None: ~/tensorflow_datasets
    c.data.eval_fraction = 0.0  # > 0 and no data.eval: hold out this share of data.train (seeded) for evaluation
    c.data.text_fields = ["sentence"]  # one name, or two for sentence pairs
    c.data.label_field = "label"  # classification: the label column
    c.data.label_names = config_dict.placeholder(list)  # None: from the training labels; else the classes in order
    c.data.buckets = config_dict.placeholder(list)  # padded lengths; None: chosen from the data (num_buckets)
    c.data.num_buckets = 5  # data.buckets unset: this many padded lengths (multiples of 8) that pad the run's
    # batches least (train: epoch 0's batches; eval: its length-sorted batches); 0: powers of two up to max_length
    c.data.group_by_length = True  # batch examples of similar length together (less padding)
    # the training source(s) read as a stream (datasets' load_dataset(..., streaming=True)), tokenized and batched as
    # they come: data larger than memory; needs max_steps; data.eval stays in memory (jaxsft/data/streaming.py)
    c.data.streaming = False
    c.data.shuffle_buffer_size = 10_000  # data.streaming: examples in the shuffle buffer (seed + epoch); 0: in order

    # causal_lm (SFT) data: the format is detected from the fields (text | prompt+completion |
    # instruction+input+output | messages) unless data.format names one.
    c.data.format = config_dict.placeholder(str)  # None: auto; text | prompt_completion | alpaca | messages
    c.data.packing = True  # causal_lm: several examples per max_length row (segment ids); False pads instead
    c.data.train_on_prompt = False  # causal_lm: also put loss on prompt / non-assistant tokens (= data.loss_on=all)
    c.data.loss_on = "assistant"  # causal_lm: assistant (every assistant turn) | last_turn (the last only) | all
    c.data.train_on_eos = True  # causal_lm: False masks the end-of-turn / EOS tokens closing each trained turn
    c.data.chat_template = config_dict.placeholder(str)  # a Jinja chat template when the tokenizer has none

    # seq2seq (translation) data: fields of a JSONL/CSV/TSV file, or two line-aligned files `src.txt,tgt.txt`
    c.data.source_field = "source"  # seq2seq / data.format translation: the source column
    c.data.target_field = "target"  # ... and the target column
    c.data.source_prefix = ""  # prepended to every source (T5: "translate English to German: ")
    c.data.max_target_length = config_dict.placeholder(int)  # None: max_length
    c.data.source_lang = "English"  # translate_llm prompt template
    c.data.target_lang = "German"  # translate_llm prompt template
    # seq2seq, multilingual tokenizers (NLLB-200, M2M100, mBART-50): the language codes set as the tokenizer's
    # src_lang / tgt_lang (NLLB: eng_Latn, deu_Latn; M2M100: en, de; mBART-50: en_XX, de_DE); the sources and
    # targets then carry those language tokens, and where the target code leads the targets (NLLB, M2M100,
    # mBART-50) generation forces it as the first token (transformers' forced_bos_token_id); None: the tokenizer's
    c.data.src_lang = config_dict.placeholder(str)
    c.data.tgt_lang = config_dict.placeholder(str)  # the target language code (see data.src_lang)

    c.max_length = 128  # tokens per row (longer examples are cut); at least 8
    c.batch_size = 32  # global, over all devices and accumulation steps
    c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
    c.gradient_accumulation_steps = 1  # batch_size is split into this many micro-batches per step
    c.num_epochs = 1  # passes over data.train (max_steps <= 0)
    c.max_steps = -1  # > 0 wins over num_epochs

    c.optimizer = "adamw"  # adamw | adafactor (T5's: updates scaled by each weight's RMS, factored second moments)
    c.learning_rate = 5e-5  # peak rate: linear warmup to it, then the lr_scheduler_type's decay
    # transformers' schedules, step for step: linear (to 0) | cosine (to 0) | cosine_with_min_lr (to min_lr_ratio) |
    # constant (no warmup) | constant_with_warmup | inverse_sqrt | warmup_stable_decay (warmup, constant, decay)
    c.lr_scheduler_type = "linear"
    c.warmup_steps = 0  # > 0 wins over warmup_ratio
    c.warmup_ratio = 0.0  # share of the run's steps spent warming up, in [0, 1]
    c.min_lr_ratio = 0.0  # cosine_with_min_lr, warmup_stable_decay: the floor, as a share of learning_rate
    c.decay_steps = 0  # warmup_stable_decay: steps of the final decay; > 0 wins over decay_ratio
    c.decay_ratio = 0.1  # warmup_stable_decay: share of the run's steps spent in the final decay
    c.decay_type = "cosine"  # warmup_stable_decay: the decay's shape: linear | cosine | 1-sqrt
    c.inverse_sqrt_timescale = config_dict.placeholder(int)  # inverse_sqrt; None: warmup steps, else 10000
    c.weight_decay = 0.0  # decoupled, on matrices only (not biases / norms)
    c.max_grad_norm = 1.0  # clip the global gradient norm to this; 0: no clipping
    c.adam_beta1 = 0.9  # adamw
    c.adam_beta2 = 0.999  # adamw
    c.adam_epsilon = 1e-8  # adamw
    c.label_smoothing = 0.0  # in [0, 1)
    # NEFTune: uniform noise of magnitude alpha / sqrt(length * hidden) on the input embeddings while training, as
    # transformers' / TRL's neftune_noise_alpha (5 in the paper); decoder families (llama & co., gpt2); 0: off
    c.neftune_noise_alpha = 0.0
    c.chunked_loss_size = 0  # causal_lm: > 0 computes logits + cross-entropy this many tokens at a time (never the
    # whole (batch, T, vocab) float32 logits; the backward pass recomputes each chunk's logits); 0: all at once
    c.skip_nonfinite_updates = False  # True: a step with a NaN/inf loss or gradient leaves the weights as they were
    c.precompile = True  # compile every batch shape of the run (train and eval) before the first step, in parallel
    # JAX's persistent compilation cache: a rerun of the same shapes loads them from this folder instead of
    # compiling; "default": $XDG_CACHE_HOME/jaxsft/xla (else ~/.cache/jaxsft/xla); "": off
    c.compilation_cache = "default"
    # where metrics go besides W/metrics.jsonl: "tensorboard" (W/tensorboard, tensorboardX) and/or "wandb" (Weights &
    # Biases: pip install 'jaxsft[wandb]'; WANDB_MODE=offline works without a network; a resumed run continues the
    # same W&B run, its id kept in W/wandb_run_id)
    c.report_to = ["tensorboard"]
    c.wandb_project = config_dict.placeholder(str)  # None: $WANDB_PROJECT, else "jaxsft"

    c.log_every_steps = 50  # a progress line (and metrics.jsonl row) every N steps
    c.eval_every_steps = -1  # <= 0: at the end of every epoch
    c.checkpoint_every_steps = -1  # <= 0: whenever the run evaluates
    c.keep_checkpoints = 2  # the newest N, plus the best by checkpoint_metric
    c.checkpoint_metric = config_dict.placeholder(str)  # None: the task's (eval_accuracy for classification)
    c.checkpoint_mode = config_dict.placeholder(str)  # max | min; None: the task's
    c.early_stopping_patience = 0  # N > 0: stop after N evaluations in a row without a better checkpoint_metric; 0: off
    c.early_stopping_threshold = 0.0  # an evaluation is better only if it beats the best so far by more than this

    # Decoding for seq2seq evaluation / generation; None: the checkpoint's generation_config.json
    c.decode = ml_collections.ConfigDict()
    c.decode.num_beams = config_dict.placeholder(int)  # beam width; 1: greedy
    c.decode.max_new_tokens = config_dict.placeholder(int)  # the longest output
    c.decode.length_penalty = config_dict.placeholder(float)  # beam scores divided by length ** this
    c.decode.early_stopping = config_dict.placeholder(bool)  # beam search stops when num_beams outputs are done
    # the token forced right after the decoder start (transformers' forced_bos_token_id); None: data.tgt_lang's
    # code where the tokenizer leads targets with it, else the checkpoint's
    c.decode.forced_bos_token_id = config_dict.placeholder(int)
    # compute dtype of decoding (generate, evaluate --predictions, generation at eval): float32 decodes as
    # transformers does on the exported float32 weights (greedy output token-identical, whatever `dtype` trained);
    # bfloat16 is faster on accelerators but near-tied logits may pick another token
    c.decode.dtype = "float32"
    # causal_lm: at each evaluation, greedy-decode the first N eval prompts (-1: all; 0: off) and score the
    # completions against the references with decode.eval_metrics (exact_match, rouge_l, bleu, chrf); the
    # completions go to W/generations/step_N.jsonl and TensorBoard. Translation data (data.format) decodes all anyway.
    c.decode.eval_samples = 0
    c.decode.eval_metrics = ["exact_match", "rouge_l"]

    # LoRA (causal_lm and classification): rank 0 = off, full fine-tuning.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # > 0: train rank-r adapters only (base frozen); 0: full fine-tuning
    c.lora.alpha = 16.0  # adapter output scaled by alpha / rank
    c.lora.dropout = 0.0  # on the adapters' input, in [0, 1)
    c.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]  # regexes matched against module paths
    c.lora.use_dora = False  # True: DoRA (PEFT's use_dora): a trained magnitude per output feature rescales W + BA
    c.lora.quantize = ""  # QLoRA: "int8" | "nf4" stores the adapted layers' frozen base kernels quantised; "": float

    c.seed = 42  # data order, hold-out split, fresh weights, dropout (>= 0)
    c.dtype = "float32"  # compute dtype; master weights stay float32
    # devices per axis; -1: the rest; expert: splits the experts of MoE models (moe.py)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    return c


# The values each numeric key may hold: an interval ("[" / "]": bound included, "(" / ")": excluded; inf: none),
# and what the error line adds. A placeholder key (default None) may also be None. Keys not listed take any value
# of their type (max_steps, eval_every_steps, checkpoint_every_steps: <= 0 means off), or are checked where they
# are used before anything is written (task, dtype, optimizer, model.remat, data.format, mesh.*).
MIN_MAX_LENGTH = 8  # fewer tokens than this hold no sentence, and buckets are multiples of 8
RANGES: dict[str, tuple[str, str]] = {
    "model.num_labels": ("[1, inf)", "1: regression"),
    "model.decoder_start_token_id": ("[0, inf)", "a token id"),
    "data.eval_fraction": ("[0, 1)", "the share of data.train held out"),
    "data.num_buckets": ("[0, inf)", "0: powers of two up to max_length"),
    "data.shuffle_buffer_size": ("[0, inf)", "0: the stream's own order"),
    "data.max_target_length": ("[2, inf)", "a target token and EOS"),
    "max_length": (f"[{MIN_MAX_LENGTH}, inf)", "tokens per row, special tokens included"),
    "batch_size": ("[1, inf)", ""),
    "eval_batch_size": ("[1, inf)", "None: batch_size"),
    "gradient_accumulation_steps": ("[1, inf)", "1: no accumulation"),
    "num_epochs": ("[0, inf)", ""),
    "learning_rate": ("(0, inf)", ""),
    "warmup_steps": ("[0, inf)", ""),
    "warmup_ratio": ("[0, 1]", "a share of the run's steps; above 1 the peak rate is never reached"),
    "min_lr_ratio": ("[0, 1]", "a share of learning_rate"),
    "decay_steps": ("[0, inf)", "0: decay_ratio"),
    "decay_ratio": ("[0, 1]", "a share of the run's steps"),
    "inverse_sqrt_timescale": ("[1, inf)", "None: the warmup steps, else 10000"),
    "weight_decay": ("[0, inf)", ""),
    "max_grad_norm": ("[0, inf)", "0: no clipping"),
    "adam_beta1": ("[0, 1)", ""),
    "adam_beta2": ("[0, 1)", ""),
    "adam_epsilon": ("(0, inf)", ""),
    "label_smoothing": ("[0, 1)", ""),
    "neftune_noise_alpha": ("[0, inf)", "0: off"),
    "chunked_loss_size": ("[0, inf)", "0: all at once"),
    "log_every_steps": ("[1, inf)", ""),
    "keep_checkpoints": ("[1, inf)", "the best is kept as well"),
    "early_stopping_patience": ("[0, inf)", "0: off"),
    "early_stopping_threshold": ("[0, inf)", "0: any improvement counts"),
    "decode.num_beams": ("[1, inf)", "1: greedy"),
    "decode.forced_bos_token_id": ("[0, inf)", "a token id"),
    "decode.max_new_tokens": ("[1, inf)", ""),
    "decode.eval_samples": ("[-1, inf)", "-1: all; 0: off"),
    "lora.rank": ("[0, inf)", "0: off"),
    "lora.alpha": ("(0, inf)", ""),
    "lora.dropout": ("[0, 1)", ""),
    "seed": ("[0, inf)", ""),
}
# The type of each item of a list key (a `--config.KEY=a,b` override is converted to it).
ITEMS: dict[str, tuple[type, ...]] = {
    "data.text_fields": (str,),
    "data.label_names": (str, int),  # class names; integers as they appear in the label column
    "data.buckets": (int,),
    "lora.target_modules": (str,),
    "decode.eval_metrics": (str,),
    "data.mixture": (str,),
    "data.mixture_weights": (float,),
    "report_to": (str,),
}
