"""turbo-batch: Ray Data + vLLM batch inference for classification and short generation.

Importing this package is cheap: it imports neither Ray nor vLLM. Those load only inside the
commands and actors that need them.
"""

__version__ = "0.1.0"
