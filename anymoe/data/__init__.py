"""Data: local files (or the shipped synthetic corpus) -> tokens -> seeded, sharded, resumable batches.

Read first: ``pipeline.py`` (the entry point), ``sampler.py`` (why DP=1 and DP=N see the same
global batch), ``datasets.py`` (label convention: labels are already shifted, -100 = no loss).
Nothing in this package downloads anything.
"""

from anymoe.data.collate import collate_lm, collate_preference, collate_prompts, count_loss_tokens
from anymoe.data.config import SHIPPED_DIR, DataConfig, resolve_path
from anymoe.data.datasets import IGNORE, PreferencePair, PromptItem, Sample
from anymoe.data.pipeline import BatchStream, DataBundle, build_data
from anymoe.data.sampler import ShardedSampler
from anymoe.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, check_vocab

__all__ = ["IGNORE", "SHIPPED_DIR", "BatchStream", "ByteTokenizer", "DataBundle", "DataConfig", "HFTokenizer",
           "PreferencePair", "PromptItem", "Sample", "ShardedSampler", "Tokenizer", "build_data",
           "build_tokenizer", "check_vocab", "collate_lm", "collate_preference", "collate_prompts",
           "count_loss_tokens", "resolve_path"]
