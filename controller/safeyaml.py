"""Reading untrusted files: a bounded regular-file reader and a YAML loader with limits.

Every file the CLI or the agent reads (configs, profiles, agent configs,
traces) can be hostile or simply wrong: a FIFO that never delivers, `/dev/zero`,
a multi-gigabyte log passed by mistake, bytes that are not UTF-8, or a YAML
"billion laughs" whose nine aliases of nine aliases expand to 9**9 nodes when a
validator walks them. Each is refused here with one line naming the file, and
the limits are checked before any work proportional to the expansion is done:

- the file must be a regular file, read at most `max_bytes` (+1 to detect more);
- the composed YAML graph may nest at most `max_depth` deep, use at most
  `max_aliases` aliases, and expand (aliases counted as the copies a consumer
  sees) to at most `max_nodes` nodes; an alias to one of its own ancestors
  (a recursive structure) is refused.

PyYAML composes recursively, so the depth is checked as nodes are composed,
long before Python's recursion limit; the expansion is measured on the graph
iteratively (memoised per node), so a bomb costs O(graph), not O(expansion).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from controller.core.errors import PdControllerError


class FileError(PdControllerError):
    """A file that cannot be read or parsed within limits; the message names the file and the reason."""


@dataclass(frozen=True)
class YamlLimits:
    max_bytes: int = 4 * 1024 * 1024
    max_depth: int = 64
    max_aliases: int = 128
    max_nodes: int = 200_000


DEFAULT_LIMITS = YamlLimits()


def read_bounded(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; FIFOs, devices and directories are refused.

    Opened non-blocking so a FIFO cannot stall the caller, then checked with
    fstat on the open descriptor (no race between the check and the read).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FileError(f"{path}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise FileError(f"{path}: {st.st_size} bytes exceeds the limit of {max_bytes}")
        chunks: list[bytes] = []
        total = 0
        while True:
            b = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > max_bytes:  # the file grew while we read it
                raise FileError(f"{path}: more than {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise FileError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def read_text_bounded(path: Path | str, max_bytes: int) -> str:
    raw = read_bounded(path, max_bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(f"{path}: not UTF-8 text (byte {e.start}: 0x{raw[e.start]:02x})") from None


class _LimitError(Exception):
    pass


def _loader(limits: YamlLimits) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        _depth = 0
        _aliases = 0

        def compose_node(self, parent: Node | None, index: Any) -> Node | None:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > limits.max_aliases:
                    raise _LimitError(f"more than {limits.max_aliases} aliases")
            self._depth += 1
            try:
                if self._depth > limits.max_depth:
                    raise _LimitError(f"nested deeper than {limits.max_depth} levels")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return Loader


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def _measure(root: Node, limits: YamlLimits) -> None:
    """Expanded size and depth of the graph (aliases count as copies); refuses cycles. Iterative."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    open_: set[int] = set()  # nodes whose children are being measured: the current path
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        if finished:
            kids = _children(node)
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            open_.discard(nid)
            if size > limits.max_nodes:
                raise _LimitError(f"expands to more than {limits.max_nodes} nodes (aliases of aliases?)")
            if depth > limits.max_depth:
                raise _LimitError(f"nested deeper than {limits.max_depth} levels once aliases are expanded")
            done[nid] = (size, depth)
            continue
        if nid in done:
            continue
        open_.add(nid)
        stack.append((node, True))
        for k in _children(node):
            if id(k) in open_:
                raise _LimitError("an alias refers to its own ancestor (recursive structure)")
            if id(k) not in done:
                stack.append((k, False))


def parse_yaml(text: str, origin: str, limits: YamlLimits = DEFAULT_LIMITS) -> Any:
    """Safe-load one YAML document within `limits`; every failure is a FileError naming `origin`."""
    if len(text) > limits.max_bytes:
        raise FileError(f"{origin}: {len(text)} characters exceeds the limit of {limits.max_bytes}")
    loader: yaml.SafeLoader | None = None
    try:
        loader = _loader(limits)(text)  # the reader refuses control characters here
        root = loader.get_single_node()
        if root is None:
            return None
        _measure(root, limits)
        return loader.construct_document(root)
    except _LimitError as e:
        raise FileError(f"{origin}: refused YAML: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FileError(f"{origin}:{where} malformed YAML: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # e.g. an integer of 10**5 digits, an impossible date (2026-13-45), an unhashable key
        raise FileError(f"{origin}: malformed YAML value: {type(e).__name__}: {str(e)[:120]}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: Path | str, limits: YamlLimits = DEFAULT_LIMITS) -> Any:
    """`parse_yaml` of a bounded regular file (see `read_bounded`)."""
    return parse_yaml(read_text_bounded(path, limits.max_bytes), str(path), limits)
