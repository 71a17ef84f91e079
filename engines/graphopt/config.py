"""What a recipe says about transformer graph optimization: off, detected, or stated."""

from __future__ import annotations

from dataclasses import dataclass

#: The stage does not run (a recipe's default: a recipe names the stages it runs).
OFF = "off"
#: Model type, heads and hidden size detected from the graph; a model that is not identified as a
#: transformer runs unfused, and the job says so.
AUTO = "auto"


@dataclass(frozen=True)
class GraphOptConfig:
    """`model_type`: "off", "auto", or a registered type (engines.graphopt.model_types) stated by the
    user. `num_heads` and `hidden_size`: None to detect them from the graph; stated values are checked
    against the graph where it shows them (a job whose values disagree is refused when it is made)."""

    model_type: str = OFF
    num_heads: int | None = None
    hidden_size: int | None = None

    @property
    def enabled(self) -> bool:
        return self.model_type != OFF

    @property
    def stated_type(self) -> str | None:
        return None if self.model_type in (OFF, AUTO) else self.model_type


def check_config(config: GraphOptConfig) -> None:
    """What a recipe's section can get wrong without looking at the model (engines.pipeline's
    validate_recipe calls it; engines.graphopt.detect.plan_fusion checks the rest against the graph)."""
    from engines.errors import InvalidRecipeError
    from engines.graphopt.model_types import MODEL_TYPES

    if config.model_type not in (OFF, AUTO, *MODEL_TYPES):
        raise InvalidRecipeError(
            f"graph_optimization.model_type '{config.model_type}' is not one of "
            f"{[OFF, AUTO, *MODEL_TYPES]} (GET /v1/capabilities lists the model types)"
        )
    stated = [name for name in ("num_heads", "hidden_size") if getattr(config, name) is not None]
    if not config.enabled and stated:
        raise InvalidRecipeError(
            f"graph_optimization states {' and '.join(stated)} but its model_type is 'off': give "
            '"model_type": "auto" (or the type) to fuse the model with them, or leave them out'
        )
    for name in stated:
        if getattr(config, name) < 1:
            raise InvalidRecipeError(f"graph_optimization.{name} must be at least 1")
    if config.num_heads and config.hidden_size and config.hidden_size % config.num_heads:
        raise InvalidRecipeError(
            f"graph_optimization.hidden_size {config.hidden_size} is not a multiple of num_heads "
            f"{config.num_heads}: every attention head is hidden_size / num_heads wide"
        )
