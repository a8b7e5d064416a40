"""Ships the CPU start-up hook `patches/crystal_sglang_cpu_support.pth` (one import line) at the root of the wheel,
regular or editable, so that pip installs it with the package and removes it with the package; nothing of this
project writes into an installed environment. The rest of the configuration is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK = Path("patches", "crystal_sglang_cpu_support.pth")


class BuildPyWithHook(build_py):
    """Regular wheels: the hook beside the packages."""

    def run(self):
        super().run()
        self.copy_file(str(HOOK), str(Path(self.build_lib, HOOK.name)))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, HOOK.name))]


class _StrategyWithHook:
    """Wraps setuptools' editable strategy (which writes only its own finder and `.pth`) to add the hook."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(HOOK.name, HOOK.read_bytes())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.strategy.__exit__(*exc_info)


class EditableWheelWithHook(editable_wheel):
    """Editable installs (`pip install -e .`, what `make install` does): the hook in the editable wheel too."""

    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithHook(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
