"""The data path: files -> rows -> one internal form -> chat template -> token ids + loss labels.

read       files, folders, globs, hub ids -> rows tagged `file line N` / `file row N` (each file read once)
sources    data.train (first data.max_rows) or a weighted data.mix -> the training rows, every file's hash and use
formats    rows -> conversations, documents or preference pairs; malformed rows are user errors
unpaired   rows -> labelled single answers for KTO (TRL's prompt/completion/label, messages + kto_tag, pairs split)
template   chat template, assistant spans, loss masks, the template check, end-of-turn ids
fit        one example into data.max_length (truncation that keeps what is trained) or why it is dropped
prompts    rows -> prompts (+ the row's other columns) for online RL
prepare    the whole path for a recipe -> `Prepared` (typed `Example`s or `PreferencePair`s + counts), in worker processes
examples   SFT examples as columns (flat int32 ids and labels + offsets) from the workers through the cache to the trainer
cache      prepared data on disk, keyed by file hashes, tokenizer, template, settings, method and seed
clean      `finetune data clean`: duplicates, near duplicates, leaks, empty answers, mojibake, personal data
"""

from finetune.data.formats import (
    ROLE_ALIASES,
    SFT_FORMATS,
    detect,
    to_messages,
    to_preference,
)
from finetune.data.examples import Examples
from finetune.data.prepare import (
    Example,
    PreferencePair,
    Prepared,
    describe_dropped,
    normalise,
    prepare,
    split_validation,
    to_dataset,
    to_preference_dataset,
    to_unpaired_dataset,
)
from finetune.data.read import READERS, Row, expand, read, read_file, read_hub
from finetune.data.sources import read_train
from finetune.data.template import (
    DEFAULT_CHAT_TEMPLATE,
    assistant_spans,
    check_template,
    end_of_turn_ids,
    ensure_chat_template,
    render,
    tokenize_conversation,
    tokenize_text,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "READERS", "ROLE_ALIASES", "SFT_FORMATS", "Example", "Examples", "PreferencePair", "Prepared", "Row",
    "assistant_spans", "check_template", "describe_dropped", "detect", "end_of_turn_ids", "ensure_chat_template", "expand",
    "normalise", "prepare", "read", "read_file", "read_hub", "read_train", "render", "split_validation", "to_dataset",
    "to_messages", "to_preference", "to_preference_dataset", "to_unpaired_dataset", "tokenize_conversation", "tokenize_text",
]
