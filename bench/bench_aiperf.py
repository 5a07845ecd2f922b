"""NVIDIA aiperf as the benchmark client of the emulated stack: fixed-schedule trace replay.

Needs the aiperf extra (aiperf==0.13.0; its own venv, see docs/profiles.md):

    HF_HUB_OFFLINE=1 /work/venvs/nvidia/bin/python bench/bench_aiperf.py [--requests 150] [--rate-scale 1]

What runs, all on 127.0.0.1 and all stopped at the end:
- the real router from PyPI in PD mode over emulated SGLang workers (1 prefill, 1 decode) timed by a
  shipped profile (`harness.fleet.EmulatedFleet`, as `pd-controller demo` uses);
- aiperf, replaying a Mooncake-format slice of the Azure conversation trace on its fixed schedule
  (`--custom-dataset-type mooncake_trace --fixed-schedule`), streaming chat completions, with goodput
  against the TTFT and ITL objectives.

The tokenizer: aiperf needs one to build prompts of the trace's lengths. Offline, a local tokenizer
folder plus HF_HUB_OFFLINE=1 trips an aiperf bug, and the emulator's stand-in tokenizer would count
aiperf's text differently. So a word-level tokenizer is built over aiperf's own prompt corpus (its
Shakespeare asset, which has no punctuation: one word = one token in the emulator's splitting too)
and put in a private Hugging Face cache folder under a temporary directory (HF_HOME), never the
user's cache.

Printed: aiperf's own TTFT / ITL percentiles and goodput, next to the same run as the workers saw it
(their Prometheus histograms, which the controller's telemetry scrapes: in PD mode the decode worker
streams the first token, so its TTFT histogram runs from its receipt of the request, without the router
hop; histogram quantiles are interpolated within buckets) and the prompt tokens both sides counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TRACE = REPO / "data/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
TOKENIZER = "pd-controller/aiperf-wordlevel"


def build_tokenizer(hf_home: Path) -> None:
    """Word-level tokenizer over aiperf's prompt corpus, in a private HF cache (snapshot 'local')."""
    import aiperf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    corpus = Path(aiperf.__file__).parent / "dataset/generator/assets/shakespeare.txt"
    vocab: dict[str, int] = {"[UNK]": 0}
    for piece in re.findall(r"\w+|[^\w\s]+", corpus.read_text()):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with single spaces
    root = hf_home / "hub" / ("models--" + TOKENIZER.replace("/", "--"))
    snap = root / "snapshots" / "local"
    snap.mkdir(parents=True, exist_ok=True)
    tok.save(str(snap / "tokenizer.json"))
    (snap / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "model_max_length": 10**7}))
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text("local")


def write_trace(path: Path, n: int, offset_s: float, rate_scale: float) -> tuple[int, int]:
    """A Mooncake JSONL slice of the Azure conversation trace (ms timestamps from 0, unique hash blocks)."""
    from controller.sim.traces import load_trace

    tr = load_trace(TRACE, "auto")
    m = tr.arrival_s >= offset_s
    a, i, o = tr.arrival_s[m][:n], tr.input_tokens[m][:n], tr.output_tokens[m][:n]
    a = (a - a[0]) / rate_scale
    nxt, total_in = 0, 0
    with path.open("w") as f:
        for t, x, y in zip(a, i, o, strict=True):
            x = int(min(int(x), 6000))
            blocks = max(1, -(-x // 512))
            f.write(json.dumps({"timestamp": round(float(t) * 1000), "input_length": x,
                                "output_length": max(1, int(min(int(y), 512))),
                                "hash_ids": list(range(nxt, nxt + blocks))}) + "\n")
            nxt += blocks
            total_in += x
    return len(a), total_in


def scrape(url: str) -> dict[str, float]:
    """Sum each sample over label sets (one worker per URL)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        le = re.search(r'le="([^"]+)"', name_labels)
        key = f"{name}|{le.group(1)}" if le else name
        out[key] = out.get(key, 0.0) + float(value)
    return out


def hist_quantile(m: dict[str, float], name: str, q: float) -> float | None:
    """Quantile from a Prometheus histogram's cumulative buckets (linear within a bucket)."""
    buckets = sorted(((float(k.split("|")[1]), v) for k, v in m.items()
                      if k.startswith(f"{name}_bucket|") and k.split("|")[1] != "+Inf"), key=lambda x: x[0])
    total = m.get(f"{name}_count", 0.0)
    if not buckets or total <= 0:
        return None
    target, lo_b, lo_c = q * total, 0.0, 0.0
    for b, c in buckets:
        if c >= target:
            return lo_b + (b - lo_b) * ((target - lo_c) / max(c - lo_c, 1e-12))
        lo_b, lo_c = b, c
    return buckets[-1][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's arrival rate")
    ap.add_argument("--offset-s", type=float, default=600.0, help="where in the trace to start")
    ap.add_argument("--profile", default="llama31-70b-h100-tp8")
    ap.add_argument("--ttft-ms", type=float, default=1000.0)
    ap.add_argument("--itl-ms", type=float, default=40.0)
    ap.add_argument("--router", default=None, help="smg (default) or sglang-router; $PD_ROUTER also works")
    args = ap.parse_args()
    aiperf_bin = shutil.which("aiperf") or str(Path(sys.executable).parent / "aiperf")
    if not Path(aiperf_bin).exists():
        print("needs the aiperf extra: pip install 'pd-controller[aiperf]' (own venv)", file=sys.stderr)
        return 2
    from harness.fleet import EmulatedFleet

    with tempfile.TemporaryDirectory(prefix="pd-aiperf-") as tmp:
        work = Path(tmp)
        build_tokenizer(work / "hf")
        n, n_in = write_trace(work / "trace.jsonl", args.requests, args.offset_s, args.rate_scale)
        env = dict(os.environ, HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with EmulatedFleet(args.profile, 1, 1, log_dir=work / "logs", router=args.router) as fleet:
            cmd = [aiperf_bin, "profile", "--model", fleet.model, "--url", fleet.router_url,
                   "--endpoint-type", "chat", "--streaming", "--tokenizer", TOKENIZER,
                   "--input-file", str(work / "trace.jsonl"), "--custom-dataset-type", "mooncake_trace",
                   "--fixed-schedule", "--goodput", f"time_to_first_token:{args.ttft_ms} inter_token_latency:{args.itl_ms}",
                   "--extra-inputs", "ignore_eos:true", "--output-artifact-dir", str(work / "out"), "--ui-type", "none"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
                print(f"aiperf exited {proc.returncode}", file=sys.stderr)
                return 1
            workers = [scrape(f"{w.url}/metrics") for w in (*fleet.prefill, *fleet.decode)]
        found = sorted(work.glob("out/**/profile_export_aiperf.json"))
        if not found:
            print("aiperf wrote no JSON export", file=sys.stderr)
            return 1
        res = json.loads(found[0].read_text())
        if os.environ.get("BENCH_AIPERF_DEBUG"):
            print(found, sorted(res), file=sys.stderr)
            print([{k: v for k, v in w.items() if k.endswith("_count")} for w in workers], file=sys.stderr)
    def metric(key: str, stat: str) -> float | None:
        v = res.get(key)
        return None if not isinstance(v, dict) else v.get(stat)

    decode = workers[1]
    w_prompt = sum(w.get("sglang:prompt_tokens_total", 0.0) for w in workers[:1])
    rows = [
        ("TTFT p50 ms", metric("time_to_first_token", "p50"), (hist_quantile(decode, "sglang:time_to_first_token_seconds", 0.5) or 0) * 1000),
        ("TTFT p90 ms", metric("time_to_first_token", "p90"), (hist_quantile(decode, "sglang:time_to_first_token_seconds", 0.9) or 0) * 1000),
        ("ITL p50 ms", metric("inter_token_latency", "p50"), (hist_quantile(decode, "sglang:inter_token_latency_seconds", 0.5) or 0) * 1000),
        ("ITL p90 ms", metric("inter_token_latency", "p90"), (hist_quantile(decode, "sglang:inter_token_latency_seconds", 0.9) or 0) * 1000),
    ]
    print(f"{n} requests ({args.profile}, 1P1D, Azure conversation x{args.rate_scale:g} from t={args.offset_s:g} s), "
          f"aiperf wall {wall:.0f} s")
    print("| metric | aiperf (client) | workers (server histograms) |")
    print("|---|---|---|")
    for name, a, w in rows:
        print(f"| {name} | {'n/a' if a is None else f'{a:.1f}'} | {w:.1f} |")
    isl = res.get("input_sequence_length") or {}
    print(f"| goodput req/s (TTFT <= {args.ttft_ms:g} ms, ITL <= {args.itl_ms:g} ms) | "
          f"{metric('goodput', 'avg') or 0:.2f} ({(metric('good_request_fraction', 'avg') or 0):.1%} of requests) | |")
    print(f"| requests completed | {metric('completed_request_count', 'avg') or metric('request_count', 'avg'):.0f} | "
          f"{sum(w.get('sglang:num_requests_total', 0.0) for w in workers[1:]):.0f} (decode worker) |")
    print(f"| prompt tokens | {isl.get('sum', float('nan')):.0f} (aiperf's count; trace {n_in}) | "
          f"{w_prompt:.0f} (prefill worker, chat template included) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
