"""Interactive multi-turn chat in the terminal.

    python -m llama.chat                                   # the embedded SmolLM2 demo model
    python -m llama.chat --ckpt_dir Meta-Llama-3-8B-Instruct/ --system "Be brief."

Replies stream as they are generated and the dialog is kept between turns. Commands: ``/reset``
starts over (keeping the system prompt), ``/exit`` (or Ctrl-D) quits. Ctrl-C while the model is
answering stops that reply, not the session. When the dialog outgrows ``max_seq_len``, the oldest
turns are dropped (the system prompt stays). One process only: it reads stdin, so no torchrun.
"""

import os
import sys
from typing import Optional

from llama.cli import COMMON_HELP, run_fire
from llama.datatypes import Dialog, Message
from llama.generation import Llama


def fit_dialog(generator: Llama, dialog: Dialog, reserve: int) -> Dialog:
    """Drop the oldest user/assistant turns until the prompt leaves ``reserve`` tokens to answer in."""
    system = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
    turns = dialog[len(system) :]
    while len(turns) > 1 and len(generator.formatter.encode_dialog_prompt(system + turns)) + reserve > generator.model.max_seq_len:
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # a user turn and its answer together
    return system + turns


def reply(generator: Llama, dialog: Dialog, temperature: float, top_p: float, max_gen_len: int) -> Message:
    """Stream one assistant reply to stdout; Ctrl-C ends it early and keeps what was said."""
    pieces: list[str] = []
    try:
        for event in generator.chat_stream(dialog, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len):
            print(event["text"], end="", flush=True)
            pieces.append(event["text"])
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print("\n", flush=True)
    return {"role": "assistant", "content": "".join(pieces)}


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    temperature: Optional[float] = None,  # None: 0.6, or llama.demo.DEMO_SETTINGS for the demo model
    top_p: Optional[float] = None,  # None: 0.9, or the demo's
    max_seq_len: int = 2048,
    max_gen_len: Optional[int] = None,  # None: 512, or the demo's
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
) -> None:
    """Chat with a model; see the module docstring for the commands."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # ranks would wait on each other's stdin
        raise ValueError(
            f"python -m llama.chat runs in one process, not under torchrun ({os.environ['WORLD_SIZE']} ranks): "
            f"run it with python; for several ranks use example_chat_completion.py"
        )
    system = None if system is None else str(system)  # fire reads --system 42 as a number
    from llama.demo import default_checkpoint, generation_settings

    defaults = {"temperature": 0.6, "top_p": 0.9, "max_gen_len": 512}
    settings = generation_settings(ckpt_dir is None, defaults, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    temperature, top_p, max_gen_len = settings["temperature"], settings["top_p"], settings["max_gen_len"]
    if ckpt_dir is None:
        ckpt_dir = str(default_checkpoint())
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, 1, device=device, dtype=dtype, quantize=quantize)
    start: Dialog = [{"role": "system", "content": system}] if system else []
    if start and (n := len(generator.formatter.encode_dialog_prompt(start))) + 16 >= max_seq_len:
        raise ValueError(  # else every message would be refused as too long, the system prompt never named
            f"the system prompt takes {n} of --max_seq_len {max_seq_len} tokens, leaving no room for a message "
            f"and its answer: use --max_seq_len {n + 512} or more, or a shorter --system"
        )
    dialog: Dialog = list(start)
    interactive = sys.stdin.isatty()
    print("Type a message; /reset starts over, /exit quits. Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line; /exit or Ctrl-D quits
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            dialog = list(start)
            print("(dialog reset)", file=sys.stderr)
            continue
        dialog = fit_dialog(generator, dialog + [{"role": "user", "content": text}], reserve=min(max_gen_len, max_seq_len // 2))
        prompt_len = len(generator.formatter.encode_dialog_prompt(dialog))
        if prompt_len >= max_seq_len:
            print(f"(message too long: {prompt_len} tokens, max_seq_len is {max_seq_len})", file=sys.stderr)
            dialog = dialog[:-1]
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        dialog.append(reply(generator, dialog, temperature, top_p, min(max_gen_len, max_seq_len - prompt_len)))


HELP = {
    **COMMON_HELP,
    "system": "system prompt that starts the dialog (kept by /reset)",
    "max_seq_len": "KV-cache length in tokens: the dialog plus the answer; older turns are dropped to fit",
}

if __name__ == "__main__":
    run_fire(main, "python -m llama.chat", HELP, description=__doc__)
