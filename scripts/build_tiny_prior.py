#!/usr/bin/env python3
"""Build dmtune's embedded default prior: a tiny GPT-2 trained from scratch offline.

The corpus is English text from the Debian packages fortunes, fortunes-min and wordnet-base
(``apt-get install -y fortunes fortunes-min wordnet-base``). Documents are formatted as
``<|endoftext|>text<|endoftext|>``, so the model starts from the BOS (= EOS) token and learns
to end its texts. ``--out`` then loads with ``GPT2LMHeadModel.from_pretrained`` and
``AutoTokenizer.from_pretrained`` and holds a model card, README.md.
"""

import argparse
import json
import math
import os
import platform
import random
import re
import subprocess
import time
from pathlib import Path

# Sleeping instead of spinning OpenMP workers keeps training fast when the cores
# are shared with other jobs (spinning threads thrash); must precede torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
DEBIAN_PACKAGES = ("fortunes", "fortunes-min", "wordnet-base")
SKIP_FORTUNE_FILES = {"ascii-art"}  # pictures, not text
SKIP_FORTUNE_DIRS = {"off"}  # offensive fortunes, if fortunes-off is installed
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MIN_CHARS = 12  # shorter pieces are mostly headings or fragments
MAX_PIECE_CHARS = 160  # about 40 BPE tokens: longer fortunes are split
MAX_SENTENCE_CHARS = 400  # single sentences longer than this are dropped
MIN_LETTER_FRACTION = 0.7  # of non-space characters; filters ASCII art, tables
MAX_NON_ASCII_FRACTION = 0.02
VALID_FRACTION = 0.02
WARMUP_FRACTION = 0.03  # of the budget (steps, or wall-clock time)
MIN_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak rate
LOG_EVERY_SECONDS = 30.0
N_CARD_SAMPLES = 5
SAMPLE_NEW_TOKENS = 32
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]*\s+(?=[\"'(]?[A-Z0-9])")
ATTRIBUTION = re.compile(r"^\s*(--|―|- [A-Z])")


def clean(text):
    """Collapse all whitespace runs to single spaces and strip the ends."""
    return " ".join(text.split())


def is_clean(text):
    """True if ``text`` looks like ordinary English prose of a useful length."""
    visible = [c for c in text if not c.isspace()]
    return (len(text) >= MIN_CHARS
            and sum(not c.isascii() for c in text) <= MAX_NON_ASCII_FRACTION * len(text)
            and sum(c.isalpha() for c in visible) >= MIN_LETTER_FRACTION * len(visible))


def split_long(text):
    """Split ``text`` at sentence ends into pieces of at most MAX_PIECE_CHARS (greedy
    merging); sentences over MAX_SENTENCE_CHARS are dropped, not cut mid-sentence."""
    if len(text) <= MAX_PIECE_CHARS:
        return [text]
    pieces, current = [], ""
    for sentence in SENTENCE_END.split(text):
        if len(sentence) > MAX_SENTENCE_CHARS:
            sentence = ""
        if current and len(current) + 1 + len(sentence) > MAX_PIECE_CHARS:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    return pieces + [current] if current else pieces


def gather_fortunes():
    """Texts of the ``%``-separated fortune files (no indexes, art or offensive files)."""
    texts = []
    for path in sorted(FORTUNE_DIR.rglob("*")):
        subdirs = set(path.relative_to(FORTUNE_DIR).parts[:-1])
        if (not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8")
                or path.name in SKIP_FORTUNE_FILES or subdirs & SKIP_FORTUNE_DIRS):
            continue
        for entry in re.split(r"^%\s*$", path.read_text(errors="replace"), flags=re.MULTILINE):
            body = clean(" ".join(x for x in entry.splitlines() if not ATTRIBUTION.match(x)))
            if is_clean(body):
                texts.extend(split_long(body))
    return texts


def gather_wordnet():
    """WordNet glosses: each definition and each quoted example is one text."""
    texts = []
    for name in WORDNET_FILES:
        for line in (WORDNET_DIR / name).read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            definition = []
            for part in line.split(" | ", 1)[1].split("; "):
                part = part.strip()
                if part.startswith('"'):
                    texts.append(part.strip('"'))
                else:
                    definition.append(part)
            texts.append("; ".join(definition))
    return texts


def build_corpus(seed):
    """Clean, deduplicate, shuffle, split: (train, valid, documents per source)."""
    seen, docs, sources = set(), [], {}
    for source, texts in (("fortunes", gather_fortunes()), ("WordNet", gather_wordnet())):
        for text in map(clean, texts):
            if is_clean(text) and text.lower() not in seen:
                seen.add(text.lower())
                docs.append(text)
                sources[source] = sources.get(source, 0) + 1
    random.Random(seed).shuffle(docs)
    n_valid = max(1, int(VALID_FRACTION * len(docs)))
    return docs[n_valid:], docs[:n_valid], sources


def train_tokenizer(docs, vocab_size, max_length):
    """Train a GPT-2 style byte-level BPE tokenizer with EOS (=BOS) and PAD."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, model_max_length=max_length)


def encode(docs, tokenizer, max_length):
    """Token ids ``[EOS] + text + [EOS]`` per document, at most ``max_length``."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(docs, add_special_tokens=False, truncation=True,
                    max_length=max_length - 2)["input_ids"]
    return [[eos] + x + [eos] for x in ids]


def make_batches(seqs, batch_tokens, pad_id, rng):
    """Length-bucketed, right-padded batches of at most ``batch_tokens`` tokens."""
    order = list(range(len(seqs)))
    rng.shuffle(order)
    order.sort(key=lambda i: len(seqs[i]))
    groups, group = [], []
    for i in order:
        if group and len(seqs[i]) * (len(group) + 1) > batch_tokens:
            groups.append(group)
            group = []
        group.append(i)
    groups.append(group)
    rng.shuffle(groups)
    for group in groups:
        width = max(len(seqs[i]) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
        mask = ids.ne(pad_id)
        yield ids, mask.long(), ids.masked_fill(~mask, -100)


def lr_factor(progress):
    """Linear warmup then cosine decay, as a function of budget fraction used."""
    if progress < WARMUP_FRACTION:
        return progress / WARMUP_FRACTION
    decay = min(1.0, (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION))
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * decay))


def train(model, seqs, args, pad_id):
    """Train with AdamW until the step (or else wall-clock) budget is spent; returns stats."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    start = last_log = time.time()
    step = epoch = tokens = 0
    recent = []

    def used():  # fraction of the budget spent: of the steps if given, else of the clock
        return step / args.steps if args.steps else (time.time() - start) / (args.minutes * 60)

    model.train()
    while used() < 1.0:
        epoch += 1
        for ids, mask, labels in make_batches(seqs, args.batch_tokens, pad_id, rng):
            progress = used()
            if progress >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor(progress)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            step += 1
            tokens += int(mask.sum())
            recent = (recent + [loss.item()])[-100:]
            if time.time() - last_log >= LOG_EVERY_SECONDS:
                last_log = time.time()
                elapsed = last_log - start
                print(f"step {step:6d}  epoch {epoch:3d}  loss {sum(recent) / len(recent):.3f}  "
                      f"lr {optimizer.param_groups[0]['lr']:.2e}  tok/s {tokens / elapsed:7.0f}  "
                      f"{elapsed / 60:5.1f} min", flush=True)
    return {"steps": step, "tokens": tokens, "seconds": time.time() - start,
            "train_loss": sum(recent) / max(1, len(recent))}


@torch.no_grad()
def evaluate(model, seqs, docs, args, pad_id):
    """Held-out perplexity per BPE token (EOS included), bits/char, word ppl."""
    model.eval()
    nll = n_tokens = 0
    for ids, mask, labels in make_batches(seqs, args.batch_tokens, pad_id, random.Random(0)):
        n = int(labels[:, 1:].ne(-100).sum())  # predicted tokens: all but the first
        nll += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
        n_tokens += n
    n_chars = sum(len(d) + 1 for d in docs)  # +1: EOS counts as a character
    n_words = sum(len(d.split()) + 1 for d in docs)  # +1: EOS counts as a word
    return {"ppl_token": math.exp(nll / n_tokens), "bits_per_char": nll / n_chars / math.log(2),
            "ppl_word": math.exp(nll / n_words), "tokens": n_tokens}


@torch.no_grad()
def sample(model, tokenizer, n, seed):
    """Ancestral samples (temperature 1) from the BOS token."""
    torch.manual_seed(seed)
    model.eval()
    start = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                         top_p=1.0, temperature=1.0, max_new_tokens=SAMPLE_NEW_TOKENS)
    return [tokenizer.decode(row[1:], skip_special_tokens=True) for row in out]


def package_versions():
    """Installed versions of the Debian packages the corpus comes from."""
    out = subprocess.run(["dpkg-query", "-W", *DEBIAN_PACKAGES], capture_output=True,
                         text=True, check=False).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def save_tokenizer(tokenizer, out):
    """Save the tokenizer under the class name every transformers version knows."""
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_model_card(out, args, info):
    """Write ``out/README.md``: purpose, recipe, data, model, results, licences."""
    t, e, c = info["train"], info["eval"], info["config"]
    recipe = {k: v for k, v in vars(args).items() if k != "minutes"} | {"steps": t["steps"]}
    command = "python scripts/build_tiny_prior.py " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in recipe.items())
    schedule = ("The schedule follows the step count, so with the same torch version and thread "
                "count this recipe reproduces the weights bit for bit." if args.steps else
                f"This run had a {args.minutes:g}-minute wall-clock budget ({t['steps']:,} steps) "
                "and its schedule followed elapsed time; the recipe's step budget rebuilds that "
                "schedule deterministically, but its weights may differ slightly from this run's.")
    versions = ", ".join(f"`{name}` {version}" for name, version in info["versions"].items())
    samples = "\n".join(f"{i + 1}. `{text!r}`" for i, text in enumerate(info["samples"]))
    sources = ", ".join(f"{n:,} from {name}" for name, n in info["sources"].items())
    card = f"""# dmtune tiny prior

A tiny GPT-2 trained from scratch on English text from Debian packages: dmtune's embedded
default prior, small enough to ship in the package and to sample 256 x 32 tokens in seconds on
a CPU, so the tool works offline. A toy, not a source of facts.

**Recipe**: `{command}`. AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup
over {WARMUP_FRACTION:.0%} of the budget, cosine decay to {MIN_LR_FRACTION:.0%} of
the peak, length-bucketed batches of at most {args.batch_tokens} tokens. {schedule}

**Data** ({versions}): fortunes (`%`-separated entries under `{FORTUNE_DIR}` except
`ascii-art`, attributions removed, long entries split at sentence ends into pieces of at most
{MAX_PIECE_CHARS} characters) and WordNet glosses (`{WORDNET_DIR}/data.*`; each definition and
each quoted example is a document). Whitespace collapsed, non-ASCII-heavy or letter-poor
entries dropped, case-insensitive duplicates removed, shuffled, {VALID_FRACTION:.0%} held out.
Documents: {sources}. Train {info["n_train"]:,} documents / {info["train_tokens"]:,} tokens,
valid {info["n_valid"]:,} / {info["valid_tokens"]:,} (BOS and EOS included).

**Tokenizer**: byte-level BPE (`tokenizers`), {c.vocab_size} tokens; `<|endoftext|>` (id
{c.eos_token_id}) is both BOS and EOS, `<|pad|>` (id {c.pad_token_id}) pads. It adds no special
tokens itself: start sequences with `<|endoftext|>` as in training. **Model**: `GPT2LMHeadModel`,
{c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.n_positions}, tied
embeddings, {info["n_params"]:,} parameters (float32).

**Training**: {t["seconds"] / 60:.1f} minutes on {info["hardware"]}, torch {torch.__version__},
{args.threads} thread(s) (cores shared with other jobs): {t["steps"]:,} steps, {t["tokens"]:,}
tokens (~{t["tokens"] / info["train_tokens"]:.1f} epochs, {t["tokens"] / t["seconds"]:,.0f}
tokens/s). Final train loss (mean of the last 100 steps) {t["train_loss"]:.3f}.

**Held-out** ({e["tokens"]:,} predicted tokens, EOS included): perplexity
**{e["ppl_token"]:.1f} per BPE token**, {e["bits_per_char"]:.3f} bits per character,
word-level perplexity {e["ppl_word"]:.0f}.

**Samples** (ancestral, temperature 1, from `<|endoftext|>`, at most {SAMPLE_NEW_TOKENS} new
tokens):

{samples}

**Licences**: `fortunes`, `fortunes-min`: BSD licence of BSD fortune(6), Copyright (c) 1991
The Regents of the University of California; quotations belong to their authors.
`wordnet-base`: WordNet 3.0 licence, which asks for this notice on all copies: WordNet 3.0
Copyright 2006 by Princeton University. All rights reserved. See `/usr/share/doc/*/copyright`.

**Limitations**: tiny and trained on a few million tokens, it writes locally plausible but
mostly incoherent text (definitions, example sentences, quips), and inherits the dated humour,
biases and stereotypes of the fortune files. Only for testing and demonstrating dmtune.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def parse_args():
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("dmtune/assets/tiny"))
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget if no --steps")
    p.add_argument("--steps", type=int, help="optimizer-step budget (reproducible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-positions", type=int, default=128)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--batch-tokens", type=int, default=512)
    return p.parse_args()


def main():
    """Build the corpus and tokenizer, train, evaluate and save the prior."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_docs, valid_docs, sources = build_corpus(args.seed)
    tokenizer = train_tokenizer(train_docs, args.vocab_size, args.n_positions)
    train_seqs = encode(train_docs, tokenizer, args.n_positions)
    valid_seqs = encode(valid_docs, tokenizer, args.n_positions)
    lengths = sorted(len(s) for s in train_seqs)
    print(f"corpus: {sources}; {len(train_docs):,} train / {len(valid_docs):,} valid docs, "
          f"{sum(lengths):,} / {sum(map(len, valid_seqs)):,} tokens; doc tokens: median "
          f"{lengths[len(lengths) // 2]}, 90th percentile {lengths[int(0.9 * len(lengths))]}")

    special = {key: getattr(tokenizer, key) for key in SPECIAL_IDS}
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=args.dropout,
        embd_pdrop=args.dropout, attn_pdrop=args.dropout, tie_word_embeddings=True, **special)
    model = GPT2LMHeadModel(config)
    print(f"model: {model.num_parameters():,} parameters", flush=True)
    stats = train(model, train_seqs, args, tokenizer.pad_token_id)
    print(f"trained {stats['steps']} steps in {stats['seconds'] / 60:.1f} min, "
          f"final train loss {stats['train_loss']:.3f}", flush=True)
    ev = evaluate(model, valid_seqs, valid_docs, args, tokenizer.pad_token_id)
    print(f"held-out: ppl/token {ev['ppl_token']:.2f}  bits/char {ev['bits_per_char']:.4f}  "
          f"ppl/word {ev['ppl_word']:.2f}", flush=True)

    model.generation_config = GenerationConfig(**special)
    samples = sample(model, tokenizer, N_CARD_SAMPLES, args.seed)
    print("\n".join(f"sample: {text!r}" for text in samples))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    save_tokenizer(tokenizer, args.out)
    write_model_card(args.out, args, {
        "versions": package_versions(), "sources": sources, "n_train": len(train_docs),
        "n_valid": len(valid_docs), "train_tokens": sum(lengths),
        "valid_tokens": sum(map(len, valid_seqs)), "config": config,
        "n_params": model.num_parameters(),
        "train": stats, "eval": ev, "samples": samples,
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores"})
    for path in args.out.iterdir():
        path.chmod(0o644)  # the weights are written as a private temp file; ship them readable
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
