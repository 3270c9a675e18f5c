"""Every public config key with its default; config files in configs/ start from `base_config()`."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = ""  # local HF folder or hub id
    c.model.num_labels = config_dict.placeholder(int)  # None: inferred from the training labels; 1: regression
    c.model.decoder_start_token_id = config_dict.placeholder(int)  # seq2seq; None: from the checkpoint
    c.model.from_scratch = False  # True: the architecture of the checkpoint's config with fresh random weights
    # Speed / memory (decoder families llama, mistral, qwen2, qwen3):
    c.model.remat = "none"  # none | dots (recompute all but matmul outputs) | full: per-layer rematerialisation
    c.model.scan_layers = False  # True: layers stacked and run under lax.scan (compile time independent of depth)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # .tsv .csv .json .jsonl .parquet, or an HF dataset spec such as glue/sst2:train
    c.data.eval = ""
    c.data.tfds_data_dir = config_dict.placeholder(str)  # for tfds:NAME[:SPLIT] specs; None: ~/tensorflow_datasets
    c.data.eval_fraction = 0.0  # > 0 and no data.eval: hold out this share of data.train (seeded) for evaluation
    c.data.text_fields = ["sentence"]  # one name, or two for sentence pairs
    c.data.label_field = "label"
    c.data.label_names = config_dict.placeholder(list)
    c.data.buckets = config_dict.placeholder(list)  # padded lengths; None: chosen from the data (num_buckets)
    c.data.num_buckets = 5  # data.buckets unset: this many padded lengths (multiples of 8) that pad the run's
    # batches least (train: epoch 0's batches; eval: its length-sorted batches); 0: powers of two up to max_length
    c.data.group_by_length = True  # batch examples of similar length together (less padding)
    # causal_lm (SFT) data: the format is detected from the fields (text | prompt+completion |
    # instruction+input+output | messages) unless data.format names one.
    c.data.format = config_dict.placeholder(str)  # None: auto; text | prompt_completion | alpaca | messages
    c.data.packing = True  # causal_lm: several examples per max_length row (segment ids); False pads instead
    c.data.train_on_prompt = False  # causal_lm: also put loss on prompt / non-assistant tokens
    c.data.chat_template = config_dict.placeholder(str)  # a Jinja chat template when the tokenizer has none
    # seq2seq (translation) data: fields of a JSONL/CSV/TSV file, or two line-aligned files `src.txt,tgt.txt`
    c.data.source_field = "source"
    c.data.target_field = "target"
    c.data.source_prefix = ""  # prepended to every source (T5: "translate English to German: ")
    c.data.max_target_length = config_dict.placeholder(int)  # None: max_length
    c.data.source_lang = "English"  # translate_llm prompt template
    c.data.target_lang = "German"

    c.max_length = 128
    c.batch_size = 32  # global, over all devices and accumulation steps
    c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
    c.gradient_accumulation_steps = 1
    c.num_epochs = 1
    c.max_steps = -1  # > 0 wins over num_epochs

    c.optimizer = "adamw"  # adamw | adafactor (T5's: updates scaled by each weight's RMS, factored second moments)
    c.learning_rate = 5e-5
    c.warmup_steps = 0
    c.warmup_ratio = 0.0
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.adam_beta1 = 0.9
    c.adam_beta2 = 0.999
    c.adam_epsilon = 1e-8
    c.label_smoothing = 0.0
    c.chunked_loss_size = 0  # causal_lm: > 0 computes logits + cross-entropy this many tokens at a time (never the
    # whole (batch, T, vocab) float32 logits; the backward pass recomputes each chunk's logits); 0: all at once
    c.skip_nonfinite_updates = False  # True: a step with a NaN/inf loss or gradient leaves the weights as they were
    c.precompile = True  # compile every batch shape of the run (train and eval) before the first step, in parallel

    c.log_every_steps = 50
    c.eval_every_steps = -1  # <= 0: at the end of every epoch
    c.checkpoint_every_steps = -1  # <= 0: whenever the run evaluates
    c.keep_checkpoints = 2  # the newest N, plus the best by checkpoint_metric
    c.checkpoint_metric = config_dict.placeholder(str)  # None: the task's (eval_accuracy for classification)
    c.checkpoint_mode = config_dict.placeholder(str)  # max | min; None: the task's

    # Decoding for seq2seq evaluation / generation; None: the checkpoint's generation_config.json
    c.decode = ml_collections.ConfigDict()
    c.decode.num_beams = config_dict.placeholder(int)
    c.decode.max_new_tokens = config_dict.placeholder(int)
    c.decode.length_penalty = config_dict.placeholder(float)
    c.decode.early_stopping = config_dict.placeholder(bool)

    # LoRA (causal_lm and classification): rank 0 = off, full fine-tuning.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]  # regexes matched against module paths

    c.seed = 42
    c.dtype = "float32"  # compute dtype; master weights stay float32
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c
