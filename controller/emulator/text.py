"""Requests as the emulator sees them: token counts from a deterministic stand-in tokenizer, output lengths.

No model is ever loaded. Input text is split the way the shipped tokenizer
(`controller/emulator/tokenizer/`, a `Whitespace` pre-tokenizer) splits it:
runs of word characters, or runs of other non-space characters. Each piece is
one token whose id is a stable hash of the piece, so the same prompt always
gives the same ids (the prefix cache and the emulated EOS rely on it).

Three request shapes arrive (the router forwards each as the client sent it,
adding `bootstrap_host`, `bootstrap_port`, `bootstrap_room`):
  /generate            {"text" | "input_ids", "sampling_params": {"max_new_tokens", "ignore_eos"}, "stream"}
  /v1/completions      {"prompt", "max_tokens", "ignore_eos", "stream", "stream_options"}
  /v1/chat/completions {"messages", "max_completion_tokens" | "max_tokens", "ignore_eos", "stream"}
Anything malformed raises BadRequest with a message naming the field and value.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

_PIECE = re.compile(r"\w+|[^\w\s]+")
VOCAB = 267  # size of the shipped tokenizer's vocabulary; ids are reduced into it

# defaults SGLang applies when the client names no length
DEFAULT_MAX_NEW_TOKENS = {"generate": 128, "completions": 16, "chat": 128}


class BadRequest(ValueError):
    """A client error: answered 400 with this message."""


def tokenize(text: str) -> list[int]:
    return [zlib.crc32(p.encode()) % VOCAB for p in _PIECE.findall(text)]


def render_chat(messages: Any) -> str:
    """The shipped chat template: 'role: content' lines, then 'assistant:'."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"messages={str(messages)[:80]!r}: must be a non-empty list of {{role, content}} objects")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]={str(m)[:80]!r}: must be an object with a string 'role'")
        content = m.get("content", "")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content={str(content)[:80]!r}: must be a string or a list of parts")
        lines.append(f"{m['role']}: {content}")
    return "\n".join(lines) + "\nassistant:"


def output_words(n: int, seed: int) -> list[str]:
    """n deterministic output 'tokens' (words of the shipped vocabulary)."""
    return [f"w{(seed + 7919 * i) % 256}" for i in range(n)]


@dataclass(frozen=True)
class GenRequest:
    kind: str  # generate | completions | chat
    input_ids: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool
    model: str
    bootstrap_host: str | None
    bootstrap_port: int | None
    bootstrap_room: int | None
    rid: str | None

    @property
    def input_tokens(self) -> int:
        return len(self.input_ids)

    def output_tokens(self, natural_len: int | None) -> tuple[int, str]:
        """Tokens this request will generate, and the finish reason.

        With ignore_eos the model runs to max_new_tokens. Otherwise the emulated
        model 'emits EOS' at a deterministic length drawn from the prompt's hash,
        uniform on [1, 2 * natural_len] (mean ~natural_len), when that comes first.
        """
        if self.ignore_eos or natural_len is None:
            return self.max_new_tokens, "length"
        h = zlib.crc32(bytes(x % 256 for x in self.input_ids[-64:]) + len(self.input_ids).to_bytes(4, "little"))
        eos_at = 1 + h % (2 * natural_len)
        if eos_at < self.max_new_tokens:
            return eos_at, "stop"
        return self.max_new_tokens, "length"


def _int_field(body: dict[str, Any], key: str, default: int | None, lo: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise BadRequest(f"{key}={v!r}: must be an integer >= {lo}")
    return v


def _bool_field(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"{key}={v!r}: must be true or false")
    return v


def _ids(v: Any, field: str) -> list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], list | str):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        return tokenize(v)
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return list(v)
    if isinstance(v, list) and v and all(isinstance(x, list | str) for x in v):
        raise BadRequest(f"{field}: batched requests ({len(v)} prompts) are not supported by the emulated worker")
    raise BadRequest(f"{field}={str(v)[:80]!r}: must be a string or a list of non-negative token ids")


def parse_request(kind: str, body: Any, context_length: int) -> GenRequest:
    """Validate one request body; BadRequest names the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    if kind == "generate":
        if body.get("input_ids") is not None:
            ids = _ids(body["input_ids"], "input_ids")
        elif body.get("text") is not None:
            ids = _ids(body["text"], "text")
        else:
            raise BadRequest("text / input_ids: one of them is required")
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise BadRequest(f"sampling_params={str(sp)[:80]!r}: must be an object")
        max_new = _int_field(sp, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS[kind], 0)
        ignore_eos = _bool_field(sp, "ignore_eos")
        include_usage = False
    elif kind == "completions":
        if "prompt" not in body:
            raise BadRequest("prompt: required")
        ids = _ids(body["prompt"], "prompt")
        max_new = _int_field(body, "max_tokens", DEFAULT_MAX_NEW_TOKENS[kind], 0)
        ignore_eos = _bool_field(body, "ignore_eos")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    elif kind == "chat":
        ids = tokenize(render_chat(body.get("messages")))
        mc = _int_field(body, "max_completion_tokens", None, 0)
        max_new = mc if mc is not None else _int_field(body, "max_tokens", DEFAULT_MAX_NEW_TOKENS[kind], 0)
        ignore_eos = _bool_field(body, "ignore_eos")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    else:  # pragma: no cover - routes are fixed
        raise BadRequest(f"unknown endpoint kind {kind!r}")
    assert max_new is not None
    if not ids:
        raise BadRequest("prompt is empty: the input has no tokens")
    if len(ids) + max_new > context_length:
        raise BadRequest(
            f"input tokens {len(ids)} + max_new_tokens {max_new} = {len(ids) + max_new} exceeds the model's "
            f"context length {context_length}"
        )
    stream = _bool_field(body, "stream")
    room = body.get("bootstrap_room")
    if room is not None and (isinstance(room, bool) or not isinstance(room, int)):
        raise BadRequest(f"bootstrap_room={room!r}: must be an integer")
    port = body.get("bootstrap_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise BadRequest(f"bootstrap_port={port!r}: must be a TCP port number")
    host = body.get("bootstrap_host")
    if host is not None and not isinstance(host, str):
        raise BadRequest(f"bootstrap_host={host!r}: must be a string")
    rid = body.get("rid")
    return GenRequest(
        kind=kind,
        input_ids=tuple(ids),
        max_new_tokens=max_new,
        ignore_eos=ignore_eos,
        stream=stream,
        include_usage=include_usage,
        model=str(body.get("model") or ""),
        bootstrap_host=host,
        bootstrap_port=port,
        bootstrap_room=room,
        rid=rid if isinstance(rid, str) else None,
    )
