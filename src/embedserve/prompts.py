"""Which text goes in front of each input: the request's `input_type` ("query" | "document" | another
prompt name of the model) and `instruction` against the model's prompts and query template. Pure."""

from __future__ import annotations

from collections.abc import Mapping

from embedserve.errors import InvalidInputType, InvalidInstruction

INSTRUCTION_SLOT = "{instruction}"
DOCUMENT_PROMPT_NAMES = ("document", "passage")  # sentence-transformers configs use either


def input_types(prompts: Mapping[str, str]) -> list[str]:
    """The `input_type` values a model accepts: query, document, and its other named prompts."""
    extra = [name for name in prompts if name not in ("query", *DOCUMENT_PROMPT_NAMES)]
    return ["query", "document", *extra]


def document_prompt(prompts: Mapping[str, str]) -> str:
    return next((prompts[name] for name in DOCUMENT_PROMPT_NAMES if name in prompts), "")


def choose_prefix(
    *,
    model: str,
    prompts: Mapping[str, str],
    default_prompt_name: str | None,
    query_template: str | None,
    default_instruction: str | None,
    input_type: str | None,
    instruction: str | None,
) -> str:
    """The prefix for every text of a request.

    No `input_type`: the model's `default_prompt_name` prompt if it has one, else the document prompt
    (plain OpenAI clients embed documents). `query`: the query template filled with `instruction` (or
    the model's default task) when the model has one, else its `query` prompt."""
    if instruction is not None and input_type != "query":
        raise InvalidInstruction(
            "'instruction' is the task of a query: send it with input_type "
            "'query' (documents take no instruction).",
            param="instruction",
        )
    if input_type is None:
        if default_prompt_name is not None:
            return prompts.get(default_prompt_name, "")
        return document_prompt(prompts)
    if input_type == "query":
        if query_template is not None:
            return query_template.replace(INSTRUCTION_SLOT, instruction or default_instruction or "")
        if instruction is not None:
            raise InvalidInstruction(
                f"The model '{model}' takes no instruction; send the query without 'instruction'.",
                param="instruction",
            )
        return prompts.get("query", "")
    if input_type == "document":
        return document_prompt(prompts)
    if input_type in prompts:
        return prompts[input_type]
    raise InvalidInputType(
        f"'input_type' must be one of {input_types(prompts)} for the model '{model}', got {input_type!r}.",
        param="input_type",
    )
