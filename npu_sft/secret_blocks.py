"""Secrets kept in Prefect Secret blocks (the UI's Blocks page), read when a task needs them: never a flow parameter
or a config value, which Prefect and MLflow store and show."""

from __future__ import annotations

from prefect.blocks.system import Secret

from npu_sft.errors import BadInputError


class SecretBlockError(BadInputError, LookupError):
    """The named Secret block does not exist on the Prefect server, or holds no string."""


def read_secret_block(name: str, setting: str) -> str:
    """The string in the Secret block `name`, which the config's `setting` names (for the error message)."""
    where = f"the Prefect Secret block {name!r} ({setting})"
    try:
        value = Secret.load(name).get()
    except ValueError:  # Prefect's "Unable to find block document named ..."
        raise SecretBlockError(
            f"{where} does not exist on the Prefect server; create it in the UI (Blocks, Secret) or with "
            f"prefect.blocks.system.Secret(value=...).save({name!r})"
        ) from None
    if not isinstance(value, str):
        raise SecretBlockError(f"{where} holds a {type(value).__name__}, not a string")
    return value
