"""The README's Python API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_example_runs(capsys):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no Python API example"
    exec(compile(block.group(1), "README.md", "exec"), {})  # 8 devices, as conftest set up
    loss, spec = capsys.readouterr().out.split(" ", 1)
    assert 5.0 < float(loss) < 6.5  # about log(384) for a fresh model
    assert "fsdp" in spec and "tensor" in spec
