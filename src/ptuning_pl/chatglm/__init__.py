"""Our own implementations of the ChatGLM models, which load the official checkpoints."""

from ptuning_pl.chatglm.modeling_v1 import (
    ChatGLM6BCache,
    ChatGLM6BConfig,
    ChatGLM6BForCausalLM,
    ChatGLM6BOutput,
)
from ptuning_pl.chatglm.tokenization_v1 import ChatGLM6BTokenizer

__all__ = [
    "ChatGLM6BCache",
    "ChatGLM6BConfig",
    "ChatGLM6BForCausalLM",
    "ChatGLM6BOutput",
    "ChatGLM6BTokenizer",
]
