"""Without vLLM, importing kvtier.vllm says what to install."""

from __future__ import annotations

import subprocess
import sys


def test_missing_vllm_gives_a_clear_message() -> None:
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "try:\n"
        "    import kvtier.vllm\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "kvtier.vllm needs vLLM 0.33.0" in out.stdout
    assert "pip install 'kvtier[vllm]'" in out.stdout
