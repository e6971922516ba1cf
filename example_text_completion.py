"""Complete a few text prompts with a pretrained (base) model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir Meta-Llama-3-8B/ \
        --tokenizer_path Meta-Llama-3-8B/tokenizer.model
    python example_text_completion.py            # no --ckpt_dir: the embedded SmolLM2 demo model

Output streams as it is generated. Under torchrun only rank 0 prints.
"""

import sys
from typing import Optional

import fire

from llama import Llama
from llama.cli import COMMON_HELP, check_fit, check_flags, user_errors


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: Optional[float] = None,  # None: 0.6 (Meta's), or llama.demo.DEMO_SETTINGS for the demo model
    top_p: Optional[float] = None,  # None: 0.9 (Meta's), or the demo's
    max_seq_len: int = 128,
    max_gen_len: Optional[int] = None,  # None: 64 (Meta's), or the demo's
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
):
    """Prompts are prefixes the model continues; base models need no chat format."""
    from llama.demo import default_checkpoint, generation_settings

    meta_defaults = {"temperature": 0.6, "top_p": 0.9, "max_gen_len": 64}
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

    prompts: list[str] = [
        # Plain continuation
        "The three things every good recipe for bread needs are",
        "Simply put, the theory of evolution says that",
        # A short few-shot pattern
        """Capital cities:
France => Paris
Japan => Tokyo
Canada =>""",
        # Translation by example
        """English to German:
good morning => guten Morgen
thank you =>""",
    ]
    # Every prompt checked before the first completion streams (BOS included, as text_stream encodes it).
    check_fit("prompt", [len(generator.tokenizer.encode(p, bos=True, eos=False)) for p in prompts], max_seq_len)
    for prompt in prompts:
        if generator.is_main_process:
            print(prompt, end="", flush=True)
        for event in generator.text_stream(prompt, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len):
            if generator.is_main_process:
                print(event["text"], end="", flush=True)
        if generator.is_main_process:
            print("\n\n==================================\n", flush=True)


if __name__ == "__main__":
    check_flags(main, COMMON_HELP, description=__doc__)  # a misspelt flag or bad value fails here, before loading
    with user_errors(sys.argv[0]):
        fire.Fire(main)
