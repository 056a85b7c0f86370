"""LoRA / QLoRA fine-tuning of Llama models from strict recipes: train, evaluate, merge, export, push."""

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a 4-bit gemm kernel from the Hub (the `kernels`
# package) and logs a warning when it cannot, which offline is always; its own fallback kernel is then used. The line
# would open the output of every command, even a one-line error, so it is shown with --debug only (cli.main).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
