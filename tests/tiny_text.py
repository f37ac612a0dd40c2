"""Tiny random-weight text models saved as transformers folders, so the tests run the real
`from_pretrained` paths offline: a BERT (MiniLM's architecture) and a CLIP BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers


def write_tiny_bert(folder: Path, words: list[str]) -> Path:
    """A BERT folder (WordPiece vocabulary of `words`, 16 wide, one layer, seeded weights)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(
        str(folder / "vocab.txt")
    )  # positional: v4 and v5 names differ
    assert tokenizer.unk_token_id not in tokenizer(" ".join(words))["input_ids"]  # the vocabulary is read
    tokenizer.save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def write_clip_tokenizer(folder: Path, words: list[str]) -> tuple[transformers.CLIPTokenizer, dict[str, int]]:
    """A CLIP BPE tokenizer whose merges build each of `words` (after the first) from its letters;
    returns it (not yet saved) and its vocabulary."""
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    merges = ["#version: 0.2"]
    for word in words[1:]:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1], *parts[2:]]
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), vocab
