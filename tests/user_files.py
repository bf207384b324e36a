"""A user's source file, written and imported in a test (the compile cache keys and records such files)."""
import importlib.util
import sys


def load_source(tmp_path, name: str, text: str):
    """Import a module written into tmp_path (as a user's file would be)."""
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
