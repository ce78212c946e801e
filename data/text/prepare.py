"""
Prepare any text to train or fine-tune on: a novel, song lyrics, a file of poems one a line.

    python data/text/prepare.py --input=my.txt --tokenizer=gpt2 --out=data/mytext
    python train.py config/finetune_lora.py --dataset=mytext

--tokenizer is gpt2 (tiktoken's GPT-2 BPE), char (one token per character of the text), or a
model to fine-tune (a folder, a hub id, a GPT-2 size, a run's out_dir): its own tokenizer, found
as init_from finds it. --documents=lines makes every non-blank line a document and ends each with
the end-of-text token, so the model learns where a document stops; the default, stream, reads
the file as one long text.

Writes train.bin and val.bin (the first 90% and the last 10% of the text; with documents, cut
between lines) and meta.json through the repo's dataset.py: uint16 token ids, or uint32 for a
vocabulary of more than 65,536 tokens. Big files are
tokenised in num_proc processes, with a progress bar.
"""

import os
import re
import sys
from contextlib import nullcontext
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)  # the repo root, wherever we run from

from configurator import configure, run  # noqa: E402
from nanogpt.atomic import check_out_dir  # noqa: E402
from nanogpt.dataset import check_dataset_folder, read_text, write_dataset  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.tokenizer import CharTokenizer, TiktokenTokenizer, from_spec  # noqa: E402

# -----------------------------------------------------------------------------
input = ""  # the text file (UTF-8)
out = ""  # the dataset folder to write, e.g. data/mytext (then train with --dataset=mytext)
tokenizer = "gpt2"  # 'gpt2', 'char', or a model: a folder, a hub id, a GPT-2 size, a run's out_dir
documents = "stream"  # 'stream': the file is one text; 'lines': a document a line, end-of-text after each
num_proc = 0  # processes that tokenise; 0 means one per CPU core
unknown = "error"  # a char model's tokenizer: characters outside its vocabulary are an 'error', or 'drop'ped
overwrite = False  # write into an --out that holds a model, or a dataset not of this repo's preparers
# -----------------------------------------------------------------------------

PIECE = 1 << 18  # characters per unit of work: big enough to be worth sending, small for the progress bar
# where a piece may end: after a lone newline, between two non-space characters. Tokenisers split
# text at whitespace before anything else, and a lone newline is a token of its own, so no token
# spans such a place and the pieces, tokenised apart, give the very ids of the whole text (a run of
# newlines would not do: GPT-2 makes "\n\n" one token at the end of a text, two before a word)
PIECE_END = re.compile(r"(?<=\S)\n(?=\S)")

def get_tokenizer(name, text):
    if name == "char":
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return TiktokenTokenizer("gpt2")
    # a model's own tokenizer, as init_from finds the model (no weights are read); torch is
    # imported only for this
    from nanogpt.checkpoint import load_tokenizer
    return load_tokenizer(name)


def drop_unknown_characters(tok, text):
    """text without the characters a char vocabulary lacks, saying which went and how many."""
    dropped = sorted(set(text) - tok.stoi.keys())
    if dropped:
        kept = "".join(ch for ch in text if ch in tok.stoi)
        print(f"dropped {len(text) - len(kept):,} characters outside the vocabulary: "
              + " ".join(repr(ch) for ch in dropped[:20]))
        text = kept
    return text


def split(text, by_lines):
    """(train text, val text): the first 90% of the characters and the rest. Documents are not
    cut in two: with by_lines the split moves back to the start of the line."""
    n = int(len(text) * 0.9)
    if by_lines:
        n = text.rfind("\n", 0, n) + 1  # 0 when there is no earlier line
    return text[:n], text[n:]


def pieces(text):
    """text cut into pieces of about PIECE characters at places no token spans (PIECE_END)."""
    out, start = [], 0
    while start < len(text):
        end = PIECE_END.search(text, start + PIECE)
        stop = end.end() if end else len(text)
        out.append(text[start:stop])
        start = stop
    return out


# the tokeniser of this process (a worker's, or the main one's when there are no workers)
_tokenizer, _eot = None, None


def start_encoder(spec, eot):
    """Set up this process to encode; a pool runs it in every worker (the spec pickles)."""
    global _tokenizer, _eot
    _tokenizer, _eot = from_spec(spec), eot


def encode_piece(piece):
    """The ids of a piece of text; with documents (_eot set), of each non-blank line, followed by
    the end-of-text token. uint32 holds the ids of any vocabulary."""
    if _eot is None:
        return np.array(_tokenizer.encode(piece), dtype=np.uint32)
    ids = []
    for line in piece.split("\n"):
        line = line.removesuffix("\r")  # a Windows line end is not part of the document
        if line.strip():
            # a tokenizer that starts texts with a token of its own starts each document with it:
            # BERT vocabularies (the Chinese GPT-2s) wrap a text as [CLS] ... [SEP], Llama's <s>
            start = [] if _tokenizer.bos_token is None else [_tokenizer.bos_token]
            ids += start + _tokenizer.encode(line) + [_eot]
    return np.array(ids, dtype=np.uint32)


def encode(tok, text, eot, processes, desc):
    """The ids of text, tokenised piece by piece in `processes` processes (when there is more
    than one piece), in order, with a progress bar in characters."""
    work = pieces(text)
    processes = min(processes, len(work))
    pool = Pool(processes, start_encoder, (tok.spec(), eot)) if processes > 1 else nullcontext()
    ids = []
    with pool, tqdm(total=len(text), unit="char", unit_scale=True, desc=desc) as bar:
        if processes > 1:
            results = pool.imap(encode_piece, work)
        else:
            start_encoder(tok.spec(), eot)
            results = map(encode_piece, work)
        for piece, piece_ids in zip(work, results):
            ids.append(piece_ids)
            bar.update(len(piece))
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)


def dataset_name(folder):
    """What --dataset takes for folder: its name if it is under the repo's data/, else its path."""
    folder = os.path.abspath(folder)
    return os.path.basename(folder) if os.path.dirname(folder) == os.path.join(REPO, "data") else folder


def main():
    cfg = configure(globals(), nullable=())
    source, out, tokenizer_name = cfg["input"], cfg["out"], cfg["tokenizer"]
    documents, num_proc, unknown = cfg["documents"], cfg["num_proc"], cfg["unknown"]
    if not source or not out:
        raise UserError("give --input=FILE (the text) and --out=FOLDER (e.g. data/mytext)")
    if documents not in ("stream", "lines"):
        raise UserError(f"documents must be 'stream' or 'lines', got {documents!r}")
    if num_proc < 0:
        raise UserError(f"num_proc must be 0 (one per CPU core) or more, got {num_proc}")
    check_out_dir(out, "--out")  # a file, a link to nowhere, read-only: before the text is tokenised
    check_dataset_folder(out, cfg["overwrite"])
    text = read_text(source)
    if not text.strip():
        raise UserError(f"{source} is empty: there is nothing to train on")
    print(f"{source}: {len(text):,} characters")
    if unknown not in ("error", "drop"):
        raise UserError(f"unknown must be 'error' or 'drop', got {unknown!r}")
    tok = get_tokenizer(tokenizer_name, text)
    if unknown == "drop" and isinstance(tok, CharTokenizer):
        text = drop_unknown_characters(tok, text)
    elif isinstance(tok, CharTokenizer):
        tok.encode("".join(set(text)))  # a character outside the vocabulary: refused before any progress bar
    eot = None
    if documents == "lines":
        if tok.eot_token is None:
            raise UserError(f"tokenizer {tokenizer_name} has no end-of-text token to end documents "
                            "with: use --documents=stream")
        eot = tok.eot_token
    processes = num_proc or os.cpu_count() or 1
    train_text, val_text = split(text, documents == "lines")
    if not train_text or not val_text:  # before any progress bar
        raise UserError(f"{source} is too short to split into train and val (90/10)")
    train_ids = encode(tok, train_text, eot, processes, "train")
    val_ids = encode(tok, val_text, eot, processes, "val")
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise UserError(f"{source} is too short to split into train and val (90/10)")
    meta = write_dataset(out, tok, train_ids, val_ids, source, overwrite=cfg["overwrite"])
    print(f"vocab size {meta['vocab_size']:,} ({meta['dtype']}); train has {meta['train_tokens']:,} "
          f"tokens, val {meta['val_tokens']:,}")
    print(f"train on it with --dataset={dataset_name(out)}")


if __name__ == "__main__":
    run(main)
