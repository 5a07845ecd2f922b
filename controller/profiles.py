"""Profile files: load a YAML profile by path or by shipped name, choose one by name only, and write one."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from controller.config import ConfigError, load_yaml
from controller.core.errors import ProfileError
from controller.core.profile import Profile, profile_from_dict

# configs/profiles/ of this checkout (the package is installed editable from a clone)
PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs" / "profiles"


def resolve_profile_path(ref: str | Path) -> Path:
    """A path, or the name of a shipped profile (e.g. `llama2-70b-h100-tp8`)."""
    p = Path(ref)
    if p.exists():
        return p
    for cand in (PROFILES_DIR / f"{ref}.yaml", PROFILES_DIR / str(ref)):
        if cand.exists():
            return cand
    shipped = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []
    raise ProfileError(f"profile={str(ref)!r}: no such file, and not a shipped profile (shipped: {', '.join(shipped)})")


# a profile NAME: no path separator, no leading dot (so no `..`), no NUL, bounded length
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def known_profiles(dirs: Iterable[Path]) -> dict[str, Path]:
    """name -> file of every `*.yaml` regular file directly in these directories (first directory wins)."""
    out: dict[str, Path] = {}
    for d in dirs:
        try:
            entries = sorted(Path(d).glob("*.yaml"))
        except OSError:
            continue
        for f in entries:
            if PROFILE_NAME.fullmatch(f.stem) and f.is_file():
                out.setdefault(f.stem, f)
    return out


def resolve_profile_name(name: object, dirs: Iterable[Path]) -> Path:
    """The file of profile `name` in `dirs`, for requests from the network: a name, never a path.

    Nothing outside `dirs` is ever touched, so the answer cannot reveal whether
    some other file exists, and no device, FIFO or huge file can be opened.
    """
    if not isinstance(name, str):
        raise ProfileError(f"profile: expected a profile name (a string), got {type(name).__name__}")
    known = known_profiles(dirs)
    shown = ", ".join(sorted(known)) or "(none)"
    if not PROFILE_NAME.fullmatch(name):
        short = repr(name) if len(name) <= 40 else repr(name[:40]) + f"... ({len(name)} chars)"
        raise ProfileError(f"profile={short}: not a profile name (letters, digits, . _ -; "
                           f"no paths): choose one of {shown}")
    path = known.get(name.removesuffix(".yaml"))
    if path is None:
        raise ProfileError(f"profile={name!r}: unknown profile: choose one of {shown}")
    return path


def load_profile_raw(ref: str | Path) -> dict[str, Any]:
    path = resolve_profile_path(ref)
    try:
        raw = load_yaml(path)
    except ConfigError as e:
        raise ProfileError(str(e)) from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    return raw


def load_profile(ref: str | Path) -> Profile:
    path = resolve_profile_path(ref)
    raw = load_profile_raw(path)
    try:
        return profile_from_dict(raw, origin=str(path))
    except ProfileError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        # a shape the validator did not foresee (e.g. a ragged tpot_ms grid): still one line naming the file
        raise ProfileError(f"{path}: not a valid profile: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def write_profile(raw: dict[str, Any], out: Path, header: str = "") -> None:
    """Write a profile YAML, validating it first so a bad file is never written."""
    profile_from_dict(raw, origin=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=120)
    out.write_text((header + "\n" if header else "") + body)
