"""Answer a few dialogs with an instruction-tuned model.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/ \
        --tokenizer_path Meta-Llama-3-8B-Instruct/tokenizer.model --max_seq_len 512 --max_batch_size 6
    python example_chat_completion.py            # no --ckpt_dir: the embedded SmolLM2 demo model

Replies stream as they are generated. Under torchrun only rank 0 prints.
"""

import sys
from typing import Optional

import fire

from llama import Dialog, Llama
from llama.cli import COMMON_HELP, check_fit, check_flags, user_errors


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: Optional[float] = None,  # None: 0.6 (Meta's), or llama.demo.DEMO_SETTINGS for the demo model
    top_p: Optional[float] = None,  # None: 0.9 (Meta's), or the demo's
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,  # None: up to max_seq_len, or the demo's
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
):
    """Each dialog ends with a user turn; the model writes the assistant's reply."""
    from llama.demo import default_checkpoint, generation_settings

    meta_defaults = {"temperature": 0.6, "top_p": 0.9, "max_gen_len": None}
    settings = generation_settings(ckpt_dir is None, meta_defaults, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    temperature, top_p, max_gen_len = settings["temperature"], settings["top_p"], settings["max_gen_len"]
    if ckpt_dir is None:
        ckpt_dir = str(default_checkpoint())
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        quantize=quantize,
    )

    dialogs: list[Dialog] = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "user", "content": "I want to learn to bake bread. Where should I start?"},
            {"role": "assistant", "content": "Start with a simple white loaf: flour, water, salt and yeast."},
            {"role": "user", "content": "How long should the dough rise?"},
        ],
        [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        [
            {"role": "system", "content": "You are a pirate. Always answer like one."},
            {"role": "user", "content": "How do I make a cup of tea?"},
        ],
    ]
    # Every dialog checked before the first reply streams: an error names the dialog, not a half-printed answer.
    lengths = [len(generator.formatter.encode_dialog_prompt(d)) for d in dialogs]
    check_fit("dialog", lengths, max_seq_len)
    for dialog in dialogs:
        if generator.is_main_process:
            for message in dialog:
                print(f"{message['role'].capitalize()}: {message['content']}\n")
            print("> Assistant: ", end="", flush=True)
        for event in generator.chat_stream(dialog, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len):
            if generator.is_main_process:
                print(event["text"], end="", flush=True)
        if generator.is_main_process:
            print("\n\n==================================\n", flush=True)


if __name__ == "__main__":
    check_flags(main, COMMON_HELP, description=__doc__)  # a misspelt flag or bad value fails here, before loading
    with user_errors(sys.argv[0]):
        fire.Fire(main)
