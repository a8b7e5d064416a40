"""Everything that knows SGLang: the plugin entry point, flags, hooks into the scheduler, the model runner and
the memory pools, and the CPU-only support. Nothing outside this package imports SGLang."""
