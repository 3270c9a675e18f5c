# COMMAND: python -m jaxsft.run --config configs/translate_nllb.py --workdir runs/translate_nllb --config.data.train=../shared/data/multi30k/train.en,../shared/data/multi30k/train.de --config.data.eval=../shared/data/multi30k/val.en,../shared/data/multi30k/val.de
"""Machine translation with NLLB-200 (M2M100 architecture, task seq2seq): fine-tune
facebook/nllb-200-distilled-600M on line-aligned parallel text (source file first) or JSONL/CSV/TSV with
`source`/`target` fields, as configs/translate.py. The language codes are keys: data.src_lang / data.tgt_lang (NLLB's
FLORES-200 codes, e.g. eng_Latn, deu_Latn, fra_Latn) become the tokenizer's src_lang / tgt_lang, so sources start
with the source code and targets with the target code; generation (evaluation, jaxsft.generate) starts from the
decoder start token (</s>) and forces the target code next, as transformers' `generate(forced_bos_token_id=...)`
does; the export writes that forced_bos_token_id into generation_config.json, so transformers decodes the same way.
Offline: a local folder holding the checkpoint (config.json, model.safetensors, the tokenizer files,
generation_config.json), e.g. `--config.model.name_or_path=/models/nllb-200-distilled-600M`. Other M2M100 / mBART-50
checkpoints take the same keys with their own codes (facebook/m2m100_418M: en, de; mBART-50: en_XX, de_DE)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from translate import get_config as translate_config  # noqa: E402


def get_config():
    c = translate_config()
    c.model.name_or_path = "facebook/nllb-200-distilled-600M"
    c.data.src_lang = "eng_Latn"
    c.data.tgt_lang = "deu_Latn"
    c.batch_size = 16  # a 600M-parameter model
    c.num_epochs = 2
    c.learning_rate = 3e-5
    return c
