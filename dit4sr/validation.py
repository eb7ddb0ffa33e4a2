"""Config errors a person can act on: pydantic's validation errors as one line per problem, naming the key by its
dotted path. Shared by the training config (``dit4sr.training.config``) and the catalog's job config."""

from __future__ import annotations

from pydantic import ValidationError


def validation_problems(error: ValidationError) -> list[str]:
    """``key: unknown key``, ``key: missing`` or ``key: <what is wrong> (got <value>)``, one per problem."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        elif item["type"] == "missing":
            problems.append(f"{key}: missing")
        else:
            problems.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return problems
