"""``python -m llama.quantize SRC DST --int8``: write an int8 folder (``llama.quantize_folder``).

An entry point only: the math above (``llama.quantize``) imports nothing of the folder tools, and
running the package this way imports this file alone, never ``llama.quantize`` a second time.
"""

from llama.quantize_folder import main

main()
