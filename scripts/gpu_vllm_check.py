"""One-shot check of the vllm classifier engine on a CUDA host; writes one JSON report.

Runs, in order, each step's result written to the report as soon as it is known:
  1. `import vllm` (version);
  2. `load_vllm_engine(artifact, model_dir)` and the batch contract on a few texts;
  3. engine throughput at batch 128 (and 32, 512) vs the bare transformers MiniLM forward on the
     same GPU (`raw_forward_throughput`, batch 128), best of `--rounds`;
  4. agreement of the engine's predictions with the same encoder head on the CPU encoder path
     (sentence-transformers on CPU, as the CPU engine's second stage runs it);
  5. optionally `pytest -m gpu tests/unit/test_classifier_gpu.py` in a subprocess.

Usage (the encoder-head artifact must be trained with the `ml` extra, not --no-encoder-head):
    python scripts/gpu_vllm_check.py --artifact PATH [--model-dir DIR] --out report.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from router_worker.classify import encoder as encoder_module  # noqa: E402
from router_worker.classify.data import load_records  # noqa: E402
from router_worker.events import CATEGORIES, Tier  # noqa: E402

CONTRACT_TEXTS = [
    "write a haiku about rain",
    "",
    "kubectl rollout restart failing",
    "integrate x^2",
]


def _note(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def _engine_throughput(engine: Any, texts: list[str], batch_size: int) -> dict[str, Any]:
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        engine.classify(texts[i : i + batch_size])
    elapsed = time.perf_counter() - start
    return {"throughput_per_s": len(texts) / elapsed, "seconds": elapsed, "n": len(texts)}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(runs, key=lambda r: float(r["throughput_per_s"]))
    return {**best, "rounds": [round(float(r["throughput_per_s"]), 1) for r in runs]}


def _agreement(engine: Any, reference: Any, texts: list[str]) -> dict[str, Any]:
    gpu_vectors = engine._embed(texts)
    cpu_vectors = reference._embed(texts)
    cosine = np.sum(gpu_vectors * cpu_vectors, axis=1)
    p_cat_gpu, p_cx_gpu = engine.head.probabilities(
        np.hstack([gpu_vectors, encoder_module.text_stats(texts)]).astype(np.float32)
    )
    p_cat_cpu, p_cx_cpu = reference.head.probabilities(
        np.hstack([cpu_vectors, encoder_module.text_stats(texts)]).astype(np.float32)
    )
    # The public path too, on a sample: classify() must give the same labels as the arrays.
    sample = texts[:256]
    public_gpu = [p.category for p in engine.classify(sample)]
    public_cpu = [p.category for p in reference.classify(sample)]
    return {
        "n": len(texts),
        "category_agreement": float(np.mean(p_cat_gpu.argmax(1) == p_cat_cpu.argmax(1))),
        "complexity_agreement": float(np.mean(p_cx_gpu.argmax(1) == p_cx_cpu.argmax(1))),
        "classify_category_agreement_sample": {
            "n": len(sample),
            "agreement": float(
                np.mean([a == b for a, b in zip(public_gpu, public_cpu, strict=True)])
            ),
        },
        "embedding_cosine": {
            "min": float(cosine.min()),
            "mean": float(cosine.mean()),
            "p01": float(np.percentile(cosine, 1)),
        },
        "max_abs_category_prob_diff": float(np.abs(p_cat_gpu - p_cat_cpu).max()),
    }


def _raw_fp16_throughput(texts: list[str], batch_size: int) -> dict[str, Any]:
    """The same bare forward as `raw_forward_throughput`, in fp16 (what vLLM runs)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(encoder_module.encoder_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float16).to("cuda").eval()
    batches = [
        tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=encoder_module.ENCODER_MAX_TOKENS,
            return_tensors="pt",
        ).to("cuda")
        for i in range(0, len(texts), batch_size)
    ]
    with torch.inference_mode():
        model(**batches[0])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"throughput_per_s": len(texts) / elapsed, "seconds": elapsed, "n": len(texts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="artifact root or version")
    parser.add_argument("--model-dir", type=Path, default=None, help="MiniLM dir (default: wheel)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "prompts")
    parser.add_argument("--n", type=int, default=2048, help="prompts for throughput/agreement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pytest", action="store_true", help="also run the gpu-marked tests")
    parser.add_argument("--date", default=date.today().isoformat())
    args = parser.parse_args(argv)

    if args.model_dir is not None:
        model_dir = args.model_dir.resolve()
        encoder_module.encoder_model_dir = lambda: model_dir  # raw forward + CPU path use it

    report: dict[str, Any] = {
        "date": args.date,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "errors": [],
    }
    # VllmEmbedder sets these defaults itself; record what the caller had set, and what ran.
    env_keys = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_FLASHINFER_SAMPLER")
    report["vllm_env_at_start"] = {k: os.environ.get(k) for k in env_keys}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    def step(name: str, fn: Any) -> Any:
        _note(f"{name} ...")
        began = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            traceback.print_exc()
            report["errors"].append({"step": name, "error": f"{type(exc).__name__}: {exc}"})
            return None
        finally:
            report.setdefault("step_seconds", {})[name] = round(time.perf_counter() - began, 2)
            save()

    import torch

    report["torch"] = torch.__version__
    # The card is read after vLLM has started: CUDA initialised here first would make vLLM
    # spawn (not fork) its engine process.
    report["card"] = None

    vllm = step("import_vllm", lambda: __import__("vllm"))
    report["vllm"] = getattr(vllm, "__version__", None)
    if vllm is None:
        save()
        return 1

    records = load_records([args.data])
    random.Random(0).shuffle(records)
    texts = [r.prompt for r in records[: args.n]]
    report["texts"] = {"source": str(args.data), "n": len(texts), "shuffle_seed": 0}

    from router_worker.classify.vllm import load_vllm_engine

    engine = step("load_vllm_engine", lambda: load_vllm_engine(args.artifact, args.model_dir))
    if engine is not None:
        llm = engine._embed.llm
        config = getattr(llm, "model_config", None)
        report["vllm_engine"] = {
            "artifact_version": engine.version,
            "dtype": str(getattr(config, "dtype", None)),
            "env_in_effect": {k: os.environ.get(k) for k in env_keys},
        }
        try:
            scheduler = llm.llm_engine.vllm_config.scheduler_config
            report["vllm_engine"]["max_num_batched_tokens"] = scheduler.max_num_batched_tokens
            report["vllm_engine"]["max_num_seqs"] = scheduler.max_num_seqs
        except AttributeError:
            pass

        def contract() -> dict[str, Any]:
            predictions = engine.classify(CONTRACT_TEXTS)
            assert len(predictions) == len(CONTRACT_TEXTS), predictions
            for p in predictions:
                assert p.category in CATEGORIES, p
                assert p.tier is Tier.ENCODER, p
                assert abs(sum(p.scores.values()) - 1.0) < 1e-6, p
            assert engine.classify([]) == []
            return {"ok": True, "predictions": [[p.category, p.complexity] for p in predictions]}

        report["contract"] = step("contract", contract)

        def engine_bench() -> dict[str, Any]:
            for i in range(0, len(texts), 128):  # warm-up: every shape once
                engine.classify(texts[i : i + 128])
            out = {}
            for size in (128, 32, 512):
                rounds = args.rounds if size == 128 else 1
                out[str(size)] = _best(
                    [_engine_throughput(engine, texts, size) for _ in range(rounds)]
                )
            return out

        report["vllm_engine"]["batches"] = step("vllm_engine_throughput", engine_bench)

    report["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    save()

    def raw_bench() -> dict[str, Any]:
        runs = [
            encoder_module.raw_forward_throughput(texts, device="cuda", batch_size=128)
            for _ in range(args.rounds)
        ]
        return {**_best(runs), "dtype": "float32 (checkpoint default)"}

    report["raw_forward_cuda"] = step("raw_forward_throughput", raw_bench)
    report["raw_forward_cuda_fp16"] = step(
        "raw_forward_fp16", lambda: _best([_raw_fp16_throughput(texts, 128) for _ in range(2)])
    )
    engine_128 = (report.get("vllm_engine") or {}).get("batches") or {}
    raw = report.get("raw_forward_cuda")
    if engine_128.get("128") and raw:
        ratio = engine_128["128"]["throughput_per_s"] / raw["throughput_per_s"]
        report["ratio_engine_vs_raw_batch128"] = round(ratio, 3)
        report["target_ratio"] = 0.7
        report["meets_target"] = ratio >= 0.7
    if engine_128.get("128") and report.get("raw_forward_cuda_fp16"):
        ratio16 = (
            engine_128["128"]["throughput_per_s"]
            / report["raw_forward_cuda_fp16"]["throughput_per_s"]
        )
        report["ratio_engine_vs_raw_fp16_batch128"] = round(ratio16, 3)

    if engine is not None:

        def agreement() -> dict[str, Any]:
            from router_worker.classify.artifacts import load_artifact, read_extra
            from router_worker.classify.cpu import ENCODER_HEAD_FILE
            from router_worker.classify.encoder import EncoderEngine

            artifact = load_artifact(args.artifact)
            arrays = read_extra(artifact, ENCODER_HEAD_FILE)
            reference = EncoderEngine.from_artifact(artifact, arrays, threads=args.cpu_threads)
            return {
                "reference": "EncoderEngine (sentence-transformers, CPU, fp32)",
                **_agreement(engine, reference, texts),
            }

        report["agreement_vs_cpu_encoder"] = step("agreement", agreement)
        del engine, llm
        gc.collect()
        save()

    if args.pytest:

        def run_pytest() -> dict[str, Any]:
            command = [
                sys.executable, "-m", "pytest", "-m", "gpu", "tests/unit/test_classifier_gpu.py",
                "-q", "-rA", "--noconftest", "-p", "no:cacheprovider",
                "-W", "ignore::pytest.PytestConfigWarning",
            ]  # fmt: skip
            done = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False
            )
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-2000:])
            return {
                "command": " ".join(command[1:]),
                "returncode": done.returncode,
                "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
            }

        report["pytest"] = step("pytest", run_pytest)

    save()
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
