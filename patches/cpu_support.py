"""Let stock SGLang 0.5.23 run on a CPU-only install (CPU torch, no CUDA stack).

Two import-time problems stop it, in every SGLang process (the launcher and the spawned scheduler and
detokenizer processes, which import SGLang's modules before any plugin runs):

- PyPI's torchvision is a CUDA build: beside CPU torch its compiled ops cannot load, and its
  `_meta_registrations` module then fails on `torchvision::nms does not exist`. SGLang imports torchvision's
  pure-Python transforms from multimodal modules at import time. When the compiled ops are absent we skip
  only that registration module: the transforms work, the detection ops stay unavailable.
- SGLang's CPU engine imports ops from `sgl_kernel`, whose CPU build is not on PyPI. When no `sgl_kernel`
  can be imported we serve `crystal_sglang.patches.sgl_kernel_cpu` under that name.

`activate()` installs one import finder that does just these two things and, on an install without a real
`sgl_kernel` (a CPU install; GPU installs have one), defaults `SGLANG_USE_CPU_ENGINE=1`. The package's wheel
carries the one-line start-up file `crystal_sglang_cpu_support.pth` (see setup.py), so pip installs it with the
package and every Python process of the environment activates the finder; where nothing is missing the finder
steps aside. Nothing of SGLang or torchvision is edited, and nothing is written into the environment at run time.
This module must stay cheap to import: it runs at every start.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types

logger = logging.getLogger("crystal_sglang")

_TORCHVISION_META = "torchvision._meta_registrations"
_SGL_KERNEL = "sgl_kernel"


def _torchvision_ops_loaded() -> bool:
    import torch

    return hasattr(torch.ops.torchvision, "nms")


class CpuImportFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the two stand-in modules; steps aside for every other import."""

    def find_spec(self, fullname, path, target=None):
        if fullname == _TORCHVISION_META and not _torchvision_ops_loaded():
            return importlib.machinery.ModuleSpec(fullname, self)
        if fullname == _SGL_KERNEL and not self._found_elsewhere(fullname, path, target):
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def _found_elsewhere(self, fullname, path, target) -> bool:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            if finder.find_spec(fullname, path, target) is not None:
                return True
        return False

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == _TORCHVISION_META:
            logger.info("torchvision's compiled ops are unavailable beside CPU torch: skipped their registration")
            return
        from crystal_sglang.patches import sgl_kernel_cpu

        for name in ("assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu"):
            setattr(module, name, getattr(sgl_kernel_cpu, name))
        module.__getattr__ = sgl_kernel_cpu.__getattr__
        module.__crystal_fallback__ = True


def activate() -> None:
    """Install the finder (once); on a CPU install, select SGLang's CPU engine unless the user chose otherwise."""
    if not any(isinstance(finder, CpuImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, CpuImportFinder())
    if importlib.machinery.PathFinder.find_spec(_SGL_KERNEL) is None:
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
