import pathlib
import sys

# tests/styles holds modules written in deliberately different styles; make them importable as `styles`.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
