"""The one exception family kernel_model raises for problems a user can fix."""


class ModelError(Exception):
    """A checkpoint, tokenizer or request that cannot be used; the message names the problem."""


class InfillingNotSupported(ModelError):
    """The tokenizer has no FIM pieces (Code Llama - Python, 34B): only left-to-right completion."""


class PromptTooLong(ModelError):
    """The prompt does not fit the model's context window."""
