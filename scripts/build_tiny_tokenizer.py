"""Builds the tiny CLIP tokenizer of `tiny-random`, `sdsjax/data/tiny_tokenizer/`.

Deterministic: running it twice writes the same files.

    python scripts/build_tiny_tokenizer.py [--out sdsjax/data/tiny_tokenizer]

A byte-level BPE laid out like OpenAI CLIP's (vocab.json, merges.txt), trained on the few hundred
words below so that prompts such as "a photo of an old man, front view" split into whole-word
tokens rather than single bytes, plus the CLIPTokenizer configs. transformers' CLIPTokenizer
loads the folder; `sdsjax.models.tiny_random` copies it into the checkpoints it writes.

Vocabulary order: the 256 byte characters, the same with `</w>`, one token per merge, then
`<|startoftext|>` and `<|endoftext|>`.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
NUM_MERGES = 1000  # at most; training stops earlier when every word is one token

# Most frequent first (the trainer gives rank r the weight 1 / (r + 10)); repeats add up.
CORPUS_TEXT = """
a the of and in to with an is on for at by from as or his her man woman photo portrait face head
view front side back overhead old young person hair eyes smiling realistic detailed high quality
beautiful bald beard child boy girl pirate painted skin light dark white black red blue green
brown grey gray yellow orange pink purple golden silver short long curly straight wearing hat
glasses smile happy sad angry serious looking camera studio lighting render 3d model sculpture
statue bust marble bronze clay cartoon anime style character closeup close up shot picture image
drawing painting oil digital art artist sharp focus soft natural sunlight shadow background
simple plain gray neutral expression mouth nose ear ears lips teeth forehead cheeks chin jaw
neck shoulders elderly middle aged teenager baby adult male female king queen soldier knight
wizard witch monster zombie robot alien elf dwarf orc viking samurai clown doctor nurse chef
farmer sailor astronaut famous actor singer president scientist teacher student man's woman's
very highly ultra 4k 8k hd trending photorealistic hyperrealistic cinematic dramatic volumetric
octane unreal engine number head number one two three four five six seven eight nine ten and
then this that these those it its
"""
CORPUS = CORPUS_TEXT.split()


def bytes_to_unicode() -> dict[int, str]:
  """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  order = printable + [b for b in range(256) if b not in printable]
  return {b: table[b] for b in order}


def train_bpe(words: list[str], num_merges: int) -> list[tuple[str, str]]:
  """A minimal BPE trainer: repeatedly merges the most frequent adjacent pair (ties: first seen)."""
  byte_chars = bytes_to_unicode()
  # Zipf-like frequencies from the corpus order, so common words merge first.
  freqs: dict[tuple[str, ...], float] = collections.OrderedDict()
  for rank, word in enumerate(words):
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    symbols = tuple([*chars[:-1], chars[-1] + "</w>"])
    freqs[symbols] = freqs.get(symbols, 0.0) + 1.0 / (rank + 10)
  merges = []
  for _ in range(num_merges):
    pair_counts: dict[tuple[str, str], float] = collections.OrderedDict()
    for symbols, f in freqs.items():
      for pair in itertools.pairwise(symbols):
        pair_counts[pair] = pair_counts.get(pair, 0.0) + f
    if not pair_counts:
      break
    best = max(pair_counts, key=lambda p: pair_counts[p])  # max keeps the first of equal counts
    merges.append(best)
    merged: dict[tuple[str, ...], float] = collections.OrderedDict()
    for symbols, f in freqs.items():
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      merged[tuple(out)] = merged.get(tuple(out), 0.0) + f
    freqs = merged
  return merges


def build() -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The vocabulary (token -> id) and the merges."""
  byte_chars = list(bytes_to_unicode().values())
  merges = train_bpe(CORPUS, NUM_MERGES)
  tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  vocab: dict[str, int] = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def write_json(path: Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write(folder: Path) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  vocab, merges = build()
  write_json(folder / "vocab.json", vocab)
  with open(folder / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2 (sdsjax tiny-random)\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  specials = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
  }
  write_json(folder / "special_tokens_map.json", specials)
  write_json(
    folder / "tokenizer_config.json",
    dict(
      specials,
      tokenizer_class="CLIPTokenizer",
      model_max_length=MAX_LENGTH,
      do_lower_case=True,
      clean_up_tokenization_spaces=True,
    ),
  )
  print(f"wrote {folder}: {len(vocab)} tokens, {len(merges)} merges")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = Path(__file__).resolve().parents[1] / "sdsjax" / "data" / "tiny_tokenizer"
  parser.add_argument("--out", type=Path, default=default)
  write(parser.parse_args().out)


if __name__ == "__main__":
  main()
