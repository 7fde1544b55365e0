#!/usr/bin/env python3
"""Quality of a text-generation model through inferd's API, as any client
can measure it: perplexity on a fixed public-domain English text, and greedy
agreement with the exact reference's tokens.

The text is the Book of Genesis in the King James Version (public domain),
from Debian's `bible-kjv-text` package (4.38, sha256 pinned below), read out
by the package's own `bible` program (both fetched with `apt-get download`
into .cache/perplexity/, nothing installed): 50 chapters, about 49,000
SmolLM2 tokens. Each chapter is one request,

    POST /v1/completions {"prompt": CHAPTER, "max_tokens": 0, "echo": true, "logprobs": 0}

and the perplexity is exp(-mean log p) over every token but each chapter's
first. Agreement: the reference prompts of scripts/gguf_reference.py
(models/fetched/smollm2/expected.json), greedy, tokens before the first
difference, summed.

    scripts/perplexity.py --variants int4-fast,int4,fp32      # starts inferd per variant
    scripts/perplexity.py --socket /run/inferd/inferd.sock --model smollm2
    scripts/perplexity.py ... --chapters 10                    # a quicker look

Prints a Markdown table; with --json, one JSON line per variant too.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from socket_client import UnixConnection  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "inferd"
CACHE = ROOT / ".cache" / "perplexity"
TEXT_DEB = ("bible-kjv-text=4.38", "bible-kjv-text_4.38_all.deb",
            "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a")
PROGRAM_DEB = "bible-kjv=4.38"  # the reader (architecture-specific: its version is pinned)
CHAPTERS_SHA256 = "26e659c842ff8a511d0cde56be19f0581a22373454f497a9efb559e307f47fab"  # the chapters, as JSON


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def genesis():
    """The 50 chapters of Genesis as plain prose, one string each (verse numbers and headings removed)."""
    out = CACHE / "genesis.json"
    if out.exists():
        return json.loads(out.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kjv-", dir=CACHE))
    subprocess.run(["apt-get", "download", TEXT_DEB[0], PROGRAM_DEB], cwd=work, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if sha256(work / TEXT_DEB[1]) != TEXT_DEB[2]:
        raise SystemExit(f"{TEXT_DEB[1]}: sha256 differs from the pinned one")
    for deb in work.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(work / "root")], check=True)
    listing = subprocess.run([str(work / "root/usr/bin/bible"), "-p", str(work / "root/usr/lib"), "gen1:1-50:26"],
                             check=True, capture_output=True, text=True).stdout
    chapters, verses = [], []
    for line in listing.splitlines():
        if re.fullmatch(r"Genesis \d+", line.strip()):
            if verses:
                chapters.append(" ".join(verses))
            verses = []
            continue
        verse = re.match(r"\s*\d+ (.*)", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if verses:
        chapters.append(" ".join(verses))
    shutil.rmtree(work)
    data = json.dumps(chapters)
    if len(chapters) != 50 or hashlib.sha256(data.encode()).hexdigest() != CHAPTERS_SHA256:
        raise SystemExit(f"read {len(chapters)} chapters of Genesis, not the pinned text")
    out.write_text(data)
    return chapters


def post(sock, path, body):
    c = UnixConnection(sock)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    answer = json.loads(c.getresponse().read())
    if "error" in answer:
        raise SystemExit(f"{path}: {answer['error']}")
    return answer


def perplexity(sock, model, chapters):
    total, count = 0.0, 0
    for text in chapters:
        answer = post(sock, "/v1/completions", {"model": model, "prompt": text, "max_tokens": 0, "echo": True,
                                                 "logprobs": 0})
        values = [v for v in answer["choices"][0]["logprobs"]["token_logprobs"] if v is not None]
        total += sum(values)
        count += len(values)
    return math.exp(-total / count), count


def byte_decoder():
    """GPT-2's byte-level alphabet, character -> byte (what tokenizer.json's vocabulary is written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def agreement(sock, model):
    """Greedy tokens before the first difference from the exact reference, summed, and their total."""
    smol = ROOT / "models" / "fetched" / "smollm2"
    reference = json.loads((smol / "expected.json").read_text())
    vocab = json.loads((smol / "tokenizer.json").read_text())["model"]["vocab"]
    decode = byte_decoder()
    ids = {i: bytes(decode.get(ch, 0) for ch in t) for t, i in vocab.items()}
    agreed = total = 0
    for case in reference["cases"]:
        body = {"model": model, "temperature": 0, "max_tokens": reference["steps"], "logprobs": True}
        if "chat" in case:
            answer = post(sock, "/v1/chat/completions", dict(body, messages=case["chat"]))
            got = [bytes(t["bytes"]) for t in answer["choices"][0]["logprobs"]["content"]]
        else:
            answer = post(sock, "/v1/completions", dict(body, prompt=case["prompt"], logprobs=0))
            got = [t.encode() for t in answer["choices"][0]["logprobs"]["tokens"]]
        want = [ids[t] for t in case["tokens"]]
        same = 0
        for a, b in zip(got, want):
            if a != b:
                break
            same += 1
        agreed += same
        total += len(want)
    return agreed, total


class Pinned:
    """inferd on a private socket serving one variant of `model` (a one-model registry)."""

    def __init__(self, model, variant, threads):
        registry = json.loads((ROOT / "models.json").read_text())
        spec = next(m for m in registry["models"] if m["name"] == model)
        spec["variants"] = [v for v in spec["variants"] if v["name"] == variant]
        if not spec["variants"]:
            raise SystemExit(f"{model} has no variant {variant}")
        for v in spec["variants"]:
            v["file"] = str(ROOT / v["file"])
        spec["generation"]["tokenizer"] = str(ROOT / spec["generation"]["tokenizer"])
        if isinstance(spec["generation"].get("chat_template"), str):
            spec["generation"]["chat_template"] = str(ROOT / spec["generation"]["chat_template"])
        self.work = Path(tempfile.mkdtemp(prefix="perplexity-"))
        (self.work / "models.json").write_text(json.dumps({"models": [spec]}))
        self.sock = str(self.work / "inferd.sock")
        env = dict(os.environ, INFERD_SOCKET__PATH=self.sock, INFERD_MODELS=str(self.work / "models.json"),
                   INFERD_MODELS_OUTSIDE="true", INFERD_MEMORY__STATE_DIR=str(self.work / "state"),
                   INFERD_LOG__LEVEL="warn", INFERD_RUNTIME__INTRA_THREADS=str(threads))
        self.daemon = subprocess.Popen([str(BIN), "serve"], env=env, stderr=subprocess.DEVNULL)
        for _ in range(500):
            if os.path.exists(self.sock):
                break
            time.sleep(0.02)

    def __enter__(self):
        return self.sock

    def __exit__(self, *exc):
        self.daemon.terminate()
        self.daemon.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--variants", help="comma-separated: start inferd on each (target/release/inferd)")
    ap.add_argument("--socket", help="score the daemon already serving here instead")
    ap.add_argument("--chapters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    chapters = genesis()[: args.chapters]
    runs = []
    if args.socket:
        runs.append(("(running)", lambda: _Nothing(args.socket)))
    for variant in (args.variants or "").split(","):
        if variant:
            runs.append((variant, lambda v=variant: Pinned(args.model, v, args.threads)))
    if not runs:
        raise SystemExit("give --variants or --socket")
    print("| variant | scored tokens | perplexity | vs the first row | greedy agreement (tokens) | seconds |")
    print("|---|---|---|---|---|---|")
    first = None
    for name, start in runs:
        with start() as sock:
            t0 = time.perf_counter()
            ppl, count = perplexity(sock, args.model, chapters)
            agreed, total = agreement(sock, args.model)
            seconds = time.perf_counter() - t0
        first = first or ppl
        print(f"| {name} | {count} | {ppl:.4f} | {100 * (ppl / first - 1):+.2f}% | {agreed} / {total} | "
              f"{seconds:.0f} |", flush=True)
        if args.json:
            print(json.dumps({"variant": name, "tokens": count, "perplexity": ppl, "agreement": agreed,
                              "agreement_of": total}), flush=True)


class _Nothing:
    def __init__(self, sock):
        self.sock = sock

    def __enter__(self):
        return self.sock

    def __exit__(self, *exc):
        pass


if __name__ == "__main__":
    main()
