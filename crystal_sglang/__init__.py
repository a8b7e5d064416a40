"""crystal-sglang: answer-first KV-cache eviction for reasoning models served by SGLang.

Kept light on purpose: a CPU install imports `crystal_sglang.patches.cpu_support` at every interpreter start.
"""

__version__ = "0.1.0"
