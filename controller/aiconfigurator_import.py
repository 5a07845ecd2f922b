"""Build profiles from NVIDIA aiconfigurator's per-operation performance database.

aiconfigurator (Apache-2.0, `pip install aiconfigurator==0.12.0`, the optional
`aiconfigurator` extra) ships GEMM, attention, MLA, MoE and communication
timings collected on silicon for H100/H200/B200/... under sglang, vllm and
trtllm, and composes them into the latency of one forward pass of a given
model at a given parallelism. This module asks it, point by point:

- prefill: `static_ctx` at batch 1 for each input length -> the time of one
  request's prefill (what `PrefillCurve` holds; batch 1 is the conservative
  end: a real server co-batches short prompts up to its chunk size);
- decode: `static_gen` with a 2-token output at batch b and input length c ->
  the time of one decode step at batch b with every sequence at context ~c
  (one output token per sequence per step, so the step time is TPOT; with MTP
  the estimator divides by the accepted tokens per step, so it is the TPOT a
  client sees);
- KV capacity: aiconfigurator's own memory model (weights, activations,
  runtime and NCCL reservations) at the backend's memory fraction, in tokens,
  with the bytes one token's KV takes.

These are modelled timings built from per-op measurements, not an end-to-end
measurement of a server; the profile's notes say so and record the database
version. Only the import needs the package; the profile it writes is plain
data that `plan`, `simulate` and the emulator read without it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.core.errors import PdControllerError, ProfileError
from controller.profile_import import isotonic_non_decreasing

INSTALL_HINT = (
    "pip install 'pd-controller[aiconfigurator]' (aiconfigurator==0.12.0 and aiconfigurator-core==0.12.0, "
    "~850 MB; keep it in its own virtual environment)"
)

# Grid defaults: input lengths a prefill curve needs for 128..32k prompts, decode batches up to 256
# (SGLang's default max running requests is higher, but B* at a 20-60 ms TPOT lies well below) and
# contexts from short chat to long RAG prompts.
DEFAULT_ISL = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_CONTEXT = (512, 1024, 2048, 4096, 8192, 16384)

# GPU memory as the profile records it (GiB per GPU), for `profile check` and the notes.
SYSTEM_HARDWARE = {
    "h100_sxm": "h100-80gb",
    "h200_sxm": "h200-141gb",
    "b200_sxm": "b200-180gb",
    "b300_sxm": "b300-288gb",
    "gb200": "gb200-186gb",
    "a100_sxm": "a100-80gb",
    "l40s": "l40s-48gb",
}


@dataclass(frozen=True)
class AicRequest:
    """One import: which model on which system with which backend and parallelism."""

    model: str  # a Hugging Face id aiconfigurator ships a config for, e.g. meta-llama/Meta-Llama-3.1-70B
    system: str  # aiconfigurator system name, e.g. h100_sxm, h200_sxm, b200_sxm
    tp: int
    backend: str = "sglang"
    backend_version: str | None = None  # None: the newest database for this system/backend
    moe_ep: int | None = None
    moe_tp: int | None = None
    nextn: int = 0  # MTP draft depth (0: off)
    nextn_accepted: float | None = None  # accepted draft tokens per step (required when nextn > 0)
    memory_fraction: float = 0.9  # SGLang's --mem-fraction-static default on large GPUs
    # aiconfigurator's own default latency corrections for disaggregated serving estimates
    # (aiconfigurator/cli/api.py DEFAULT_{PREFILL,DECODE}_LATENCY_CORRECTION_SCALE = 1.1, 1.08): the
    # static op sums are multiplied by these to match what a served engine shows. 1.0 turns them off.
    prefill_correction: float = 1.1
    decode_correction: float = 1.08
    isl: Sequence[int] = DEFAULT_ISL
    batch: Sequence[int] = DEFAULT_BATCH
    context: Sequence[int] = DEFAULT_CONTEXT
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ProfileError(f"tp={self.tp!r}: must be an integer >= 1")
        if self.nextn < 0:
            raise ProfileError(f"nextn={self.nextn!r}: must be >= 0")
        if self.nextn > 0 and (self.nextn_accepted is None or not 0 <= self.nextn_accepted <= self.nextn):
            raise ProfileError(
                f"nextn_accepted={self.nextn_accepted!r}: with nextn={self.nextn} it must be given, 0 <= accepted <= nextn"
            )
        for key in ("prefill_correction", "decode_correction"):
            if not 0.5 <= getattr(self, key) <= 2.0:
                raise ProfileError(f"{key}={getattr(self, key)!r}: must be in [0.5, 2]")
        if not 0 < self.memory_fraction <= 1:
            raise ProfileError(f"memory_fraction={self.memory_fraction!r}: must be in (0, 1]")
        for key in ("isl", "batch", "context"):
            vals = list(getattr(self, key))
            if not vals or any(v < 1 for v in vals) or any(b <= a for a, b in itertools.pairwise(vals)):
                raise ProfileError(f"{key}={vals!r}: must be positive and strictly increasing")


def _aic() -> tuple[Any, Any, str]:
    """The aiconfigurator entry points, or a clear error naming the extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model configs ship in the wheel; never reach a hub
    try:
        from aiconfigurator.cli.api import cli_estimate  # type: ignore[import-not-found]
        from aiconfigurator_core.sdk.memory import estimate_kv_cache  # type: ignore[import-not-found]
    except ModuleNotFoundError as e:
        raise PdControllerError(f"profile import-aiconfigurator needs aiconfigurator ({e.name} not installed): {INSTALL_HINT}") from None
    import importlib.metadata as md

    return cli_estimate, estimate_kv_cache, md.version("aiconfigurator-core")


@contextlib.contextmanager
def _quiet() -> Any:
    """aiconfigurator logs fallbacks at WARNING per query; keep one import's output to our summary."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(old)


def _parallel_kwargs(req: AicRequest) -> dict[str, Any]:
    kw: dict[str, Any] = {"tp_size": req.tp, "backend_name": req.backend}
    if req.backend_version:
        kw["backend_version"] = req.backend_version
    if req.moe_ep is not None:
        kw["moe_ep_size"] = req.moe_ep
    if req.moe_tp is not None:
        kw["moe_tp_size"] = req.moe_tp
    if req.nextn:
        kw["nextn"] = req.nextn
        kw["nextn_accepted"] = req.nextn_accepted
    kw.update(req.extra)
    return kw


def shipped_models() -> list[str]:
    """Hugging Face ids whose config.json ships in aiconfigurator-core (usable offline)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("aiconfigurator_core")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return sorted(p.name.removesuffix("_config.json").replace("--", "/", 1)
                  for p in folder.glob("*_config.json") if not p.name.endswith("_hf_quant_config.json"))


def import_aiconfigurator(req: AicRequest) -> dict[str, Any]:
    """Query aiconfigurator over the grid and return a profile dict (schema v1)."""
    cli_estimate, estimate_kv_cache, core_version = _aic()
    known = shipped_models()
    if req.model not in known:
        # aiconfigurator would try to download an unknown model's config.json; we stay offline
        raise ProfileError(
            f"model={req.model!r}: aiconfigurator ships no config for it (offline import); "
            f"known: {', '.join(m for m in known if '/' in m)[:400]}..."
        )
    kw = _parallel_kwargs(req)
    prefill_ms: list[float] = []
    decode: list[list[float]] = []
    meta: dict[str, Any] = {}
    try:
        with _quiet():
            for isl in req.isl:
                r = cli_estimate(req.model, req.system, mode="static_ctx", isl=int(isl), osl=2, batch_size=1, **kw)
                prefill_ms.append(float(r.ttft) * req.prefill_correction)
                meta = {"version": r.backend_version, "gemm": r.raw.get("gemm"), "kvcache": r.raw.get("kvcache"),
                        "fmha": r.raw.get("fmha"), "moe": r.raw.get("moe"), "weights_gib": r.raw.get("memory")}
            for ctx in req.context:
                row = []
                for b in req.batch:
                    r = cli_estimate(req.model, req.system, mode="static_gen", isl=int(ctx), osl=2, batch_size=int(b), **kw)
                    row.append(float(r.tpot) * req.decode_correction)
                decode.append(row)
            kv = estimate_kv_cache(
                req.model, req.system, req.backend, meta["version"],
                max_num_tokens=8192, max_batch_size=int(max(req.batch)),
                memory_fraction_kind="of_free" if req.backend == "trtllm" else "of_total",
                memory_fraction_value=req.memory_fraction, tp_size=req.tp,
                moe_tp_size=req.moe_tp, moe_ep_size=req.moe_ep, nextn=req.nextn,
            )
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProfileError(
            f"aiconfigurator cannot estimate model={req.model!r} system={req.system!r} backend={req.backend!r} tp={req.tp}: {first}"
        ) from None
    # The estimator is deterministic, but attention kernels switch lanes between shapes, so a
    # longer prompt can come out a hair faster than a shorter one; the profile must be monotone.
    prefill_ms = isotonic_non_decreasing(prefill_ms)
    decode = [isotonic_non_decreasing(row) for row in decode]
    cols = list(zip(*decode, strict=True))
    cols = [isotonic_non_decreasing(c) for c in cols]
    decode = [list(r) for r in zip(*cols, strict=True)]
    short = req.model.split("/")[-1].lower().replace("meta-llama-", "llama-")
    hardware = SYSTEM_HARDWARE.get(req.system, req.system)
    mtp = f"-mtp{req.nextn}" if req.nextn else ""
    name = req.name or f"{short}-{req.system.split('_')[0]}-tp{req.tp}{mtp}-{req.backend}"
    per_token = float(kv["kv_size_per_token_bytes"])
    mem_gib = float(kv["total_gpu_capacity_bytes"]) / 2**30
    quant = ", ".join(f"{k} {v}" for k, v in meta.items() if k in ("gemm", "kvcache", "fmha", "moe") and v)
    par = f"TP{req.tp}" + (f" EP{req.moe_ep}" if req.moe_ep else "") + (f" MoE-TP{req.moe_tp}" if req.moe_tp else "")
    mtp_note = (
        f"MTP on: {req.nextn} draft token(s), {req.nextn_accepted} accepted per step on average (an assumption, "
        "not measured here); TPOT is per output token as a client sees it. "
        if req.nextn
        else "MTP off. "
    )
    return {
        "schema": "pd-controller/profile/v1",
        "name": name,
        "model": req.model,
        "hardware": hardware,
        "tensor_parallel": req.tp,
        "source": (
            f"NVIDIA aiconfigurator {core_version} (aiconfigurator-core {core_version}) performance database, "
            f"system {req.system}, backend {req.backend} {meta['version']}, database mode SILICON"
        ),
        "license": "Apache-2.0 (data: NVIDIA aiconfigurator / aiconfigurator-core); see configs/profiles/LICENSES.md",
        "notes": (
            "Modelled, not measured end to end: aiconfigurator composes per-operation timings collected on silicon "
            f"(GEMM, attention, MoE, communication) into one forward pass of {req.model} at {par} on {req.system} "
            f"under {req.backend} {meta['version']} ({quant}). Prefill: static_ctx at batch 1 per input length, "
            f"x {req.prefill_correction:g}. Decode: static_gen step time at batch b with every sequence at context c, "
            f"x {req.decode_correction:g} (aiconfigurator's default latency corrections for disaggregated serving). "
            + mtp_note
            + f"KV capacity: aiconfigurator's memory model at memory fraction {req.memory_fraction} of {mem_gib:.0f} GiB "
            f"per GPU ({per_token:.0f} bytes of KV per token per GPU). No fixed overhead and no KV-transfer time are "
            "included: set overhead_s / kv_transfer for your network. Grid made isotonic (tiny lane-switch dips)."
        ),
        "overhead_s": 0.0,
        "kv_transfer": {"base_s": 0.0, "per_token_s": 0.0},
        "gpu_memory_gib": round(mem_gib, 2),
        "prefill": {
            "input_len": [int(x) for x in req.isl],
            "time_ms": [round(x, 3) for x in prefill_ms],
            "gpus_per_instance": req.tp,
        },
        "decode": {
            "batch": [int(x) for x in req.batch],
            "context": [float(x) for x in req.context],
            "tpot_ms": [[round(x, 4) for x in row] for row in decode],
            "gpus_per_instance": req.tp,
            "kv_capacity_tokens": float(kv["total_kv_size_tokens"]),
            # bytes across the instance (the estimator reports one GPU's shard)
            "kv_bytes_per_token": per_token * req.tp,
        },
    }
