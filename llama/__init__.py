"""llama: pure-PyTorch reference inference for Meta's Llama 3 / 3.1 checkpoints."""

from llama import openmp

openmp.configure()  # before torch is imported: OpenMP reads its wait policy once (llama/openmp.py)

from llama.chat_format import ChatFormat
from llama.datatypes import ChatPrediction, CompletionPrediction, Dialog, Message, Role, StopReason, ToolCall
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatFormat",
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Role",
    "StopReason",
    "Tokenizer",
    "ToolCall",
    "Transformer",
]
