"""Stand-in for `aisimulate_core.sdk` over `aiconfigurator_core.sdk` (see ../../README.md).

Dynamo's planner builds one `ForwardPassPerfModelConfig` per role and asks
`RustForwardPassPerfModel.best_available(asdict(config))` for a model. With no
profiled system ("unprofiled", estimation mode `fpm_regression`) the real SDK
falls back to its regression model; so does this stand-in, always: it hands the
legacy engine options (observation window, bucket grid, token/batch/KV bounds)
to aiconfigurator-core's compiled `RustForwardPassPerfModel.from_regression`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from aiconfigurator_core.sdk import RustForwardPassPerfModel as _CoreModel

__all__ = ["ForwardPassPerfModelConfig", "RustForwardPassPerfModel"]


@dataclass
class ForwardPassPerfModelConfig:
    model: str
    system: str
    backend: str
    worker_type: str
    estimation_mode: str = "fpm_regression"
    tp: int = 1
    pp: int = 1
    attention_dp: int = 1
    nextn: int = 0
    kv_block_size: int | None = None
    estimator_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_legacy_engine_config(
        cls, legacy: dict[str, Any], worker_type: str, options: dict[str, Any]
    ) -> ForwardPassPerfModelConfig:
        return cls(
            model=str(legacy.get("model_name", "")),
            system=str(legacy.get("system_name", "unprofiled")),
            backend=str(legacy.get("backend", "sglang")),
            worker_type=worker_type,
            tp=int(legacy.get("tp_size", 1)),
            pp=int(legacy.get("pp_size", 1)),
            estimator_config={"regression": dict(options)},
        )


class RustForwardPassPerfModel:
    """`best_available` = aiconfigurator-core's regression model with the legacy options."""

    @classmethod
    def best_available(cls, config: dict[str, Any], options: dict[str, Any] | None = None) -> Any:
        if config.get("estimation_mode", "fpm_regression") != "fpm_regression":
            raise RuntimeError("the aisimulate_core stand-in supports estimation_mode='fpm_regression' only")
        opts = dict((config.get("estimator_config") or {}).get("regression") or {})
        opts.update(options or {})
        return _CoreModel.from_regression(opts or None)

    from_regression = staticmethod(_CoreModel.from_regression)
