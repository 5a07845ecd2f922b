"""The node agent's own configuration: where it listens, which keys it trusts, and the only programs it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.config import ConfigError, format_validation_error, load_yaml

# the only placeholders an argv template may use; substituted per element, never through a shell
PLACEHOLDERS = ("{role}", "{port}", "{host}", "{bootstrap_port}")


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(..., description="ZeroMQ bind address, e.g. tcp://127.0.0.1:7001")
    worker_url: str = Field(..., description="the server this agent manages, e.g. http://127.0.0.1:8001")
    initial_role: Literal["prefill", "decode"] = "decode"
    start: list[str] = Field(..., min_length=1, description="argv template that starts the server in {role}")
    stop: list[str] | None = Field(None, description="argv template that stops it; None = SIGTERM our child")
    bootstrap_port: int | None = None
    server_secret_key: Path | None = Field(None, description="agent's CURVE secret key file (.key_secret)")
    authorized_keys_dir: Path | None = Field(None, description="directory of trusted client public keys (.key)")
    insecure: bool = Field(False, description="no CURVE at all (tests of the protocol only; refuses non-loopback)")
    health_path: str = "/health"
    start_timeout_s: float = Field(60.0, gt=0)
    stop_timeout_s: float = Field(10.0, gt=0)
    poll_interval_s: float = Field(0.2, gt=0)
    start_on_launch: bool = Field(True, description="start the server in initial_role when the agent starts")
    state_file: Path | None = Field(
        None, description="where the agent records the server it started (pid, start time, role), to adopt it "
        "after a restart; None = $XDG_RUNTIME_DIR (or the temp dir)/pd-agent-UID/server-HOST-PORT.json"
    )

    @field_validator("start", "stop")
    @classmethod
    def _no_shell(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for a in v:
            if not isinstance(a, str) or not a:
                raise ValueError(f"argv element {a!r}: expected a non-empty string")
        if v[0] in ("sh", "bash", "/bin/sh", "/bin/bash") and "-c" in v:
            raise ValueError(f"argv {v[:3]!r}: a shell string is not allowed; list the program and its arguments")
        return v

    @model_validator(mode="after")
    def _keys(self) -> AgentConfig:
        if not self.insecure and (self.server_secret_key is None or self.authorized_keys_dir is None):
            raise ValueError(
                "CURVE needs server_secret_key and authorized_keys_dir "
                f"(got {self.server_secret_key!r}, {self.authorized_keys_dir!r}); insecure: true only for tests"
            )
        if self.insecure and not (self.endpoint.startswith("tcp://127.0.0.1:") or self.endpoint.startswith("ipc://")):
            raise ValueError(f"endpoint={self.endpoint!r}: insecure mode binds loopback or ipc only")
        return self

    def state_path(self) -> Path:
        if self.state_file is not None:
            return self.state_file
        from urllib.parse import urlsplit

        from controller.agent.owned import default_state_dir

        u = urlsplit(self.worker_url)
        return default_state_dir() / f"server-{u.hostname or 'localhost'}-{u.port or 80}.json"


def load_agent_config(path: Path | str) -> AgentConfig:
    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    base = path.parent
    for k in ("server_secret_key", "authorized_keys_dir", "state_file"):
        if isinstance(raw.get(k), str) and not Path(raw[k]).is_absolute():
            raw[k] = str(base / raw[k])
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
