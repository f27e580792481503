"""Load test of `blenderbot-mb serve`: N concurrent clients for T seconds, against 127.0.0.1 only.

    python benchmarks/load_test.py --clients 16 --seconds 20 --threads 1       # the default model, CPU
    python benchmarks/load_test.py --shape 400M-distill --device cuda --dtype bfloat16 \\
        --clients 64 --seconds 30 --max-tokens 30 --max-batch 64               # random 400M-distill weights
    python benchmarks/load_test.py --shape 400M-distill --device cuda --dtype bfloat16 --kernels \\
        --warmup-seconds 60 --clients 64 --seconds 30 --max-tokens 30 --max-batch 64  # Triton kernels
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --model-name NAME  # a server already running

Without --url it starts the server twice on a free localhost port (`blenderbot-mb serve` in a child
process): once with dynamic batching (--max-batch) and once one request at a time (--max-batch 1), and
reports both and the gain. Each client sends chat completions back to back (greedy, exactly --max-tokens
reply tokens unless --free-length), cycling through the packaged corpus prompts; the clients are spread over
--client-processes processes, so that the client side does not cap the load. Reported: requests/s,
p50/p99 latency, generated tokens/s, the mean batch size (from /metrics); and checks that every request
was answered (none lost) and that no reply is another prompt's reply (each prompt's reply, taken alone
first, is its expected reply; under bfloat16 a batched reply may differ from the solo one numerically,
which is counted apart from a mix-up). Exits 1 if a request was lost or mixed up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_SECONDS, MAX_CLIENTS = 600, 1024


def prompts(count: int) -> list[str]:
    from blenderbot_mb.data import corpus_pairs

    return list(dict.fromkeys(context for context, _ in corpus_pairs()))[:count]


# ---------------------------------------------------------------------- the model and the server
def random_model(shape: str, folder: str) -> str:
    """Random weights of a published shape, the packaged tokenizer, greedy generation settings."""
    import torch

    from blenderbot_mb import BlenderbotConfig, GenerationConfig
    from blenderbot_mb.tokenizer import corpus_lines, train_tokenizer
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    torch.manual_seed(0)
    config = BlenderbotConfig.from_preset(shape if shape.startswith("blenderbot-") else "blenderbot-" + shape)
    BlenderbotForConditionalGeneration(config).eval().save_pretrained(folder)
    tokenizer = train_tokenizer(corpus_lines(), vocab_size=1000)
    assert len(tokenizer) <= config.vocab_size
    tokenizer.save_pretrained(folder)
    GenerationConfig.from_dict(dict(num_beams=1, max_length=60, min_length=0, no_repeat_ngram_size=0,
                                    encoder_no_repeat_ngram_size=0, forced_eos_token_id=2, decoder_start_token_id=1,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, folder: str, max_batch: int, store: str):
    port = free_port()
    command = [sys.executable, "-m", "blenderbot_mb.cli", "serve", "--model", folder, "--port", str(port),
               "--backend", args.backend, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(4 * args.clients), "--store", store, "--served-model-name", "load-test",
               "--log-level", "warning"]
    if args.device:
        command += ["--device", args.device]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.engine:
        command += ["--engine", args.engine]
    if args.kernels:
        command += ["--kernels"]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, server)
    return server, url


def wait_until_healthy(url: str, server=None, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} did not become healthy in {timeout:.0f} s")


# ---------------------------------------------------------------------- the load
def request_body(args, prompt: str) -> dict:
    body = {"model": args.model_name, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens, "temperature": 0}
    if not args.free_length:
        body["min_tokens"] = args.max_tokens
    return body


async def expected_replies(args, url: str, texts: list[str]) -> dict[str, str]:
    """Each prompt's reply when it is the only request (the reference for the mix-up check)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        out = {}
        for text in texts:
            r = await client.post("/v1/chat/completions", json=request_body(args, text))
            if r.status_code != 200:
                raise SystemExit(f"the first requests, sent one at a time, failed: HTTP {r.status_code}: {r.text}")
            out[text] = r.json()["choices"][0]["message"]["content"]
        return out


async def clients(args, url: str, texts: list[str], expected: dict[str, str], ks: list[int], start_at: float):
    """Clients `ks` (of 0..clients-1), from wall-clock time `start_at` for --seconds: their raw results."""
    import httpx

    latencies, tokens, errors = [], 0, []
    counts = {"sent": 0, "ok": 0, "lost": 0, "mixed": 0, "differs": 0}
    by_reply = {reply: text for text, reply in expected.items()}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    end = time.monotonic() + args.seconds

    async def client_loop(client, k: int):
        nonlocal tokens
        i = k
        while time.monotonic() < end:
            text = texts[i % len(texts)]
            i += args.clients
            counts["sent"] += 1
            start = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json=request_body(args, text))
                body = r.json()
                reply = body["choices"][0]["message"]["content"]
            except (httpx.HTTPError, KeyError, ValueError) as e:
                counts["lost"] += 1
                if not errors:  # the first error's body, at once (the server log has the traceback)
                    errors.append(f"HTTP {r.status_code}: {r.text}" if isinstance(e, (KeyError, ValueError))
                                  else f"{type(e).__name__}: {e}")
                    print("first error:", errors[0], file=sys.stderr, flush=True)
                continue
            latencies.append(time.perf_counter() - start)
            tokens += body["usage"]["completion_tokens"]
            counts["ok"] += 1
            if reply != expected[text]:
                counts["mixed" if by_reply.get(reply, text) != text else "differs"] += 1

    limits = httpx.Limits(max_connections=len(ks), max_keepalive_connections=len(ks))
    async with httpx.AsyncClient(base_url=url, timeout=args.seconds + 120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, k) for k in ks))
    return dict(counts=counts, latencies=latencies, tokens=tokens, errors=errors, ended=time.time())


def client_process(args, url: str, texts: list[str], expected: dict[str, str], ks: list[int], start_at: float):
    return asyncio.run(clients(args, url, texts, expected, ks, start_at))


def load(args, url: str, texts: list[str], expected: dict[str, str]) -> dict:
    """All clients, spread over --client-processes processes (one Python HTTP client spends milliseconds of
    CPU per request, which would cap the load it can send), started together."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    processes = min(args.client_processes, args.clients)
    shares = [list(range(p, args.clients, processes)) for p in range(processes)]
    before = asyncio.run(batch_metrics(url))
    start_at = time.time() + (0.1 if processes == 1 else 5.0)  # time for the client processes to start
    if processes == 1:
        parts = [client_process(args, url, texts, expected, shares[0], start_at)]
    else:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(client_process, *zip(*[(args, url, texts, expected, ks, start_at)
                                                         for ks in shares], strict=True)))
    elapsed = max(p["ended"] for p in parts) - start_at
    after = asyncio.run(batch_metrics(url))
    counts = {k: sum(p["counts"][k] for p in parts) for k in parts[0]["counts"]}
    latencies = sorted(x for p in parts for x in p["latencies"])
    errors = [e for p in parts for e in p["errors"]]
    tokens = sum(p["tokens"] for p in parts)
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (
        lambda q: float("nan"))
    batches = after[1] - before[1]
    return dict(counts, first_error=errors[0] if errors else None, seconds=round(elapsed, 2),
                requests_per_s=round(counts["ok"] / elapsed, 2), p50_s=round(pick(0.50), 4),
                p99_s=round(pick(0.99), 4), tokens_per_s=round(tokens / elapsed, 1),
                mean_batch=round((after[0] - before[0]) / batches, 2) if batches else None)


async def batch_metrics(url: str) -> tuple[float, float]:
    """(requests decoded, generate() calls) so far, from the server's Prometheus metrics."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        text = (await client.get("/metrics")).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    return values.get("blenderbot_mb_batch_size_sum", 0.0), values.get("blenderbot_mb_batch_size_count", 0.0)


def run_phase(args, url: str, texts: list[str]) -> dict:
    expected = asyncio.run(expected_replies(args, url, texts))
    if args.warmup_seconds:  # the same load, not counted: shapes the server meets first compile (--kernels)
        load(argparse.Namespace(**dict(vars(args), seconds=args.warmup_seconds)), url, texts, expected)
    return load(args, url, texts, expected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (127.0.0.1 only); default: start one")
    parser.add_argument("--model-name", default="load-test", help="the served model name (with --url)")
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--shape", help="random weights of a published shape, e.g. 400M-distill")
    parser.add_argument("--backend", default="torch", choices=("torch", "tf", "flax"))
    parser.add_argument("--device")
    parser.add_argument("--dtype", help="torch dtype of the weights, e.g. bfloat16")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the server")
    parser.add_argument("--engine", choices=("process", "thread"), help="where the server decodes (default: "
                        "serve's default, a process of its own)")
    parser.add_argument("--kernels", action="store_true", help="serve --kernels (Triton kernels, NVIDIA GPUs)")
    parser.add_argument("--warmup-seconds", type=float, default=0.0, help="the same load first, not counted")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--client-processes", type=int, help="processes the clients are spread over "
                        "(default: one per 16 clients, at most 8)")
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--free-length", action="store_true", help="let replies end at EOS (default: exactly "
                        "--max-tokens tokens)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts the clients cycle through")
    parser.add_argument("--skip-unbatched", action="store_true", help="only the batched run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS):
        parser.error(f"--clients must be in [1, {MAX_CLIENTS}] and --seconds in (0, {MAX_SECONDS}]")
    if args.client_processes is None:
        args.client_processes = min(8, -(-args.clients // 16))
    if args.client_processes < 1:
        parser.error("--client-processes must be >= 1")
    if args.url and urlparse(args.url).hostname not in LOCAL_HOSTS:
        parser.error(f"refusing to load {args.url}: this script only targets 127.0.0.1 / localhost")
    texts = prompts(args.prompts)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    if args.url:
        results["batched"] = run_phase(args, args.url.rstrip("/"), texts)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = random_model(args.shape, os.path.join(tmp, "model")) if args.shape else args.model
            if folder is None:
                from blenderbot_mb.default_model import default_model_path

                folder = default_model_path()
            phases = [("batched", args.max_batch)] + ([] if args.skip_unbatched else [("one_at_a_time", 1)])
            for name, max_batch in phases:
                server, url = start_server(args, folder, max_batch, os.path.join(tmp, f"{name}.sqlite3"))
                try:
                    results[name] = run_phase(args, url, texts)
                finally:
                    server.terminate()
                    server.wait(60)
                print(name, json.dumps(results[name]), flush=True)
    if "one_at_a_time" in results:
        results["batching_gain_tokens_per_s"] = round(
            results["batched"]["tokens_per_s"] / max(results["one_at_a_time"]["tokens_per_s"], 1e-9), 2)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    phases = [v for k, v in results.items() if k in ("batched", "one_at_a_time")]
    return 1 if any(p["lost"] or p["mixed"] for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
